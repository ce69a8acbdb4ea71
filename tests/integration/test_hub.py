"""The Hub mirror against the loopback Hub (tests/support/hub_server.py) through the real huggingface_hub client,
with checkpoints in a real RunStorage (moto S3 or a local folder) that looks as Ray leaves it."""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi

from orchestrator.services.hub import HubMirror, HubSettings, StorageFetch
from orchestrator.core.store import SNAPSHOT, RunStorage
from relay_train import checkpoint as ckpt

REPO_ID = "relay-tester/run"
ROOT = ("sd35-run-lokr.safetensors", "sd35-run-lokr-ema.safetensors")


def _payload(step: int) -> ckpt.CheckpointPayload:
    g = torch.Generator().manual_seed(step)
    adapter = {
        "lycoris_blocks_0_attn.lokr_w1": torch.randn(8, 8, generator=g),
        "lycoris_blocks_0_attn.lokr_w2": torch.randn(16, 16, generator=g),
    }
    return ckpt.CheckpointPayload(
        step=step,
        adapter=adapter,
        adapter_metadata={"step": str(step)},
        ema={k: v * 0.5 for k, v in adapter.items()},
        optimizer={"state": {}, "param_groups": []},
        scheduler={"last_epoch": step},
        rng={"seed": torch.tensor([step])},
        training_state={"step": step},
        config_json='{"masked": "***"}',
    )


class FakeRay:
    """Writes checkpoint-N into a RunStorage as Ray Train leaves it: files, then the snapshot naming the
    newest `keep` (Ray prunes older folders; tests on S3 leave them, as the snapshot alone decides)."""

    def __init__(self, storage: RunStorage, tmp: Path, keep: int = 5):
        self.storage, self.tmp, self.keep, self.steps = storage, tmp, keep, []

    def commit(self, step: int) -> None:
        local = self.tmp / f"staging-{step}"
        ckpt.write_checkpoint(local, _payload(step))
        self.storage.upload_dir(local, f"checkpoint-{step}")
        self.steps = (self.steps + [step])[-self.keep :]
        self.storage.write_json(
            SNAPSHOT, {"checkpoint_results": [{"checkpoint_dir_name": f"checkpoint-{s}"} for s in self.steps]}
        )


def _settings(**kw) -> HubSettings:
    return HubSettings(
        **{
            "repo_id": REPO_ID,
            "run_name": "run",
            "base_model": "stabilityai/stable-diffusion-3.5-medium",
            "backoff_base_s": 0.2,
            "backoff_max_s": 2.0,
            "warn_every_s": 0.0,
            **kw,
        }
    )


def _assert_mirrors(server, storage: RunStorage, steps: list[int]) -> None:
    """The repo holds exactly these checkpoints, byte for byte as storage holds them, and the root files."""
    repo = server.repos[REPO_ID]
    held = sorted({int(p.split("/")[1].removeprefix("checkpoint-")) for p in repo.files if p.startswith("checkpoints/")})
    assert held == steps
    for step in steps:
        manifest = storage.read_json(f"checkpoint-{step}/{ckpt.MANIFEST}")
        names = sorted([*manifest["files"], ckpt.MANIFEST])
        prefix = f"checkpoints/checkpoint-{step}/"
        assert sorted(p[len(prefix) :] for p in repo.files if p.startswith(prefix)) == names
        for name in names:
            assert repo.read(prefix + name) == storage.read_bytes(f"checkpoint-{step}/{name}"), f"{prefix}{name} differs"
    newest = steps[-1]
    assert repo.read(ROOT[0]) == storage.read_bytes(f"checkpoint-{newest}/{ckpt.ADAPTER}")
    assert repo.read(ROOT[1]) == storage.read_bytes(f"checkpoint-{newest}/{ckpt.ADAPTER_EMA}")


def test_eight_checkpoints_leave_the_newest_five_byte_for_byte(hub_server, s3_bucket, s3_endpoint, tmp_path):
    _, bucket = s3_bucket
    storage = RunStorage(f"s3://{bucket}/runs", "run", endpoint_url=s3_endpoint)
    ray = FakeRay(storage, tmp_path)
    warnings: list[str] = []
    api = HfApi(endpoint=hub_server.url)  # the real client, injected, pointed at the loopback Hub
    mirror = HubMirror(_settings(), api=api, fetch=StorageFetch(storage), warn=warnings.append, work_dir=tmp_path / "hub").start()
    for step in range(1, 9):
        ray.commit(step)
        mirror.submit(step)
        if step in (6, 8):
            mirror.note_validation(step, [("cat.png", b"\x89PNG fake image %d" % step)], {"clip_score": 0.25 + step / 100})
        assert mirror.flush(30), mirror.status()  # one commit per checkpoint when the Hub keeps up
    assert mirror.close(10)

    repo = hub_server.repos[REPO_ID]
    _assert_mirrors(hub_server, storage, [4, 5, 6, 7, 8])
    assert repo.private  # hub_private defaults to true
    extra = {p for p in repo.files if not p.startswith("checkpoints/")}
    assert extra == {
        ".gitattributes",
        "README.md",
        *ROOT,
        "validation/step-6/cat.png",
        "validation/step-6/scores.json",
        "validation/step-8/cat.png",
        "validation/step-8/scores.json",
    }
    card = repo.read("README.md").decode()
    assert "Step 8" in card and "![cat](validation/step-8/cat.png)" in card and "| 8 | 0.33 |" in card
    assert len(repo.commits) == 1 + 8 and mirror.status()["commits"] == 8  # the initial commit + one per step
    assert warnings == [] and hub_server.state.unauthorized == 0


def test_a_failing_hub_never_blocks_training_and_the_mirror_catches_up(hub_server, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    storage = RunStorage(str(tmp_path / "store"), "run")
    ray = FakeRay(storage, tmp_path)
    warnings: list[str] = []
    mirror = HubMirror(_settings(), fetch=StorageFetch(storage), warn=warnings.append, work_dir=tmp_path / "hub").start()
    assert mirror.flush(10)  # repo created and listed
    hub_server.fail(429, seconds=3.0, retry_after=1, path="/commit/")  # the commit rate limit for 3 s ...
    hub_server.fail(500, seconds=3.0, start_in=3.0)  # ... then a sick Hub, every endpoint, for 3 s more
    step_s, blocked = 0.4, []
    start = time.perf_counter()
    for step in range(1, 9):
        time.sleep(step_s)  # a "training step" between checkpoints
        ray.commit(step)
        t0 = time.perf_counter()
        mirror.submit(step)
        blocked.append(time.perf_counter() - t0)
    loop_s = time.perf_counter() - start
    print(
        f"\nsubmit blocked per checkpoint: max {max(blocked) * 1e3:.3f} ms, "
        f"mean {statistics.mean(blocked) * 1e3:.3f} ms; loop {loop_s:.2f} s for {8 * step_s:.1f} s of steps "
        "(the rest is writing checkpoints to storage)"
    )
    assert max(blocked) < 0.05
    assert mirror.close(60), mirror.status()
    caught_up_s = time.perf_counter() - start
    status = mirror.status()
    failed = {code: sum(hub_server.state.count(m, "", code) for m in ("GET", "POST", "HEAD", "PUT")) for code in (429, 500)}
    print(
        f"mirror caught up {caught_up_s:.1f} s after the first step: {status['commits']} commit(s), "
        f"{status['skipped']} step(s) coalesced away, answers refused {failed}, {len(warnings)} warning(s)"
    )
    assert hub_server.state.count("POST", "/commit/", 429) >= 1
    _assert_mirrors(hub_server, storage, [4, 5, 6, 7, 8])
    assert sum(hub_server.state.count(m, "", s) for m in ("GET", "POST", "HEAD") for s in (429, 500)) > 0
    assert warnings and all("training is not affected" in w for w in warnings)
    token = hub_server.state.token
    assert token not in caplog.text and not any(token in w for w in warnings)
    assert token not in hub_server.repos[REPO_ID].read("README.md").decode()


def test_killed_mid_push_then_a_new_mirror_reconciles(hub_server, tmp_path):
    storage = RunStorage(str(tmp_path / "store"), "run")
    ray = FakeRay(storage, tmp_path)
    first = HubMirror(_settings(), fetch=StorageFetch(storage), work_dir=tmp_path / "hub1", warn=lambda m: None).start()
    for step in range(1, 6):
        ray.commit(step)
        first.submit(step)
    assert first.flush(30)
    hub_server.fail(500, count=1000, path="/commit/")  # uploads land, the commit never does
    ray.commit(6)
    first.submit(6)
    deadline = time.monotonic() + 20
    while first.status()["failures_in_a_row"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.status()["failures_in_a_row"] >= 1
    assert not first.close(0.1)  # killed: work left behind
    for step in (7, 8):  # the run resumes and goes on before the new mirror starts
        ray.commit(step)
    hub_server.heal()
    commits_before = len(hub_server.repos[REPO_ID].commits)

    second = HubMirror(_settings(), fetch=StorageFetch(storage), work_dir=tmp_path / "hub2").start()
    second.reconcile(storage.checkpoint_steps())
    assert second.close(30), second.status()
    _assert_mirrors(hub_server, storage, [4, 5, 6, 7, 8])
    assert len(hub_server.repos[REPO_ID].commits) == commits_before + 1  # one reconciling commit
    # every commit's tree holds whole checkpoints only: each folder is exactly its manifest's files
    for commit in hub_server.repos[REPO_ID].commits:
        folders = {p.rsplit("/", 1)[0] for p in commit.tree if p.startswith("checkpoints/")}
        for folder in folders:
            manifest = json.loads(commit.tree[f"{folder}/{ckpt.MANIFEST}"].data)
            held = sorted(p[len(folder) + 1 :] for p in commit.tree if p.startswith(folder + "/"))
            assert held == sorted([*manifest["files"], ckpt.MANIFEST]), (commit.title, folder)
    assert second.status()["hub_steps"] == [4, 5, 6, 7, 8]


def test_falling_behind_coalesces_and_respects_the_commit_limit(hub_server, tmp_path):
    storage = RunStorage(str(tmp_path / "store"), "run")
    ray = FakeRay(storage, tmp_path)
    mirror = HubMirror(
        _settings(commits_per_window=2, window_s=1.5), fetch=StorageFetch(storage), work_dir=tmp_path / "hub"
    ).start()
    for step in range(1, 9):
        ray.commit(step)
        mirror.submit(step)
    assert mirror.close(30), mirror.status()
    repo = hub_server.repos[REPO_ID]
    _assert_mirrors(hub_server, storage, [4, 5, 6, 7, 8])
    ours = [c for c in repo.commits if c.title != "initial commit"]
    assert len(ours) < 8  # coalesced
    times = [c.time for c in ours]
    assert all(b - a >= 1.5 - 0.05 for a, b in zip(times, times[2:])), times  # never 3 commits in 1.5 s
    ever = {p.split("/")[1] for c in repo.commits for p in c.tree if p.startswith("checkpoints/")}
    assert "checkpoint-1" not in ever or len(ours) > 1  # a skipped step is never uploaded only to be pruned


def test_super_squash_frees_the_space_of_pruned_checkpoints(hub_server, tmp_path):
    storage = RunStorage(str(tmp_path / "store"), "run")
    ray = FakeRay(storage, tmp_path, keep=3)
    mirror = HubMirror(
        _settings(keep=3, super_squash=True, squash_interval_s=0.0), fetch=StorageFetch(storage), work_dir=tmp_path / "hub"
    ).start()
    for step in range(1, 6):
        ray.commit(step)
        mirror.submit(step)
        assert mirror.flush(30)
    assert mirror.close(10)
    repo = hub_server.repos[REPO_ID]
    current = sum(size for _, size in {(b.sha256, len(b.data)) for b in repo.files.values()})
    assert repo.squashes == 2 and mirror.status()["squashes"] == 2  # after the prunes at steps 4 and 5
    assert repo.history_bytes() == current and len(repo.commits) == 1


@pytest.mark.slow
def test_hub_adapter_loads_with_lycoris(hub_server, make_config, tmp_path, tiny_model):
    from diffusers import SD3Transformer2DModel
    from huggingface_hub import hf_hub_download
    from lycoris import create_lycoris_from_weights

    import safetensors

    from relay_train.trainer import build_trainer

    def safe_metadata(data: bytes) -> dict:
        size = int.from_bytes(data[:8], "little")
        return json.loads(data[8 : 8 + size])["__metadata__"]

    config = make_config(
        out="run",
        max_train_steps=2,
        checkpointing_steps=2,
        ema_update_interval=1,
        train_batch_size=2,
        push_to_hub=True,
        push_checkpoints_to_hub=True,
        hub_model_id=REPO_ID,
        tracker_run_name="run",
    )
    trainer = build_trainer(config)
    result = trainer.fit()
    storage = RunStorage(str(Path(config.output_dir).parent), "run")
    storage.write_json(SNAPSHOT, {"checkpoint_results": [{"checkpoint_dir_name": "checkpoint-2"}]})
    mirror = HubMirror.for_run(config, storage, work_dir=tmp_path / "hub")
    if mirror is not None:
        mirror.start()
    assert mirror is not None and mirror.close(30), mirror.status()

    repo = hub_server.repos[REPO_ID]
    for exported in result.exported:  # the root files carry the export's tensors and metadata (safetensors
        # writes metadata in hash-map order, so equal files need not be equal bytes)
        ours = dict(safetensors.deserialize(repo.read(exported.name)))
        assert ours == dict(safetensors.deserialize(exported.read_bytes()))
        with safetensors.safe_open(str(exported), "pt") as fh:
            assert safe_metadata(repo.read(exported.name)) == fh.metadata()
    path = hf_hub_download(REPO_ID, "sd35-run-lokr-ema.safetensors", cache_dir=tmp_path / "cache")
    transformer = SD3Transformer2DModel.from_pretrained(tiny_model / "transformer")
    network, weights = create_lycoris_from_weights(1.0, path, transformer)
    loaded = {f"{m.lora_name}.{k}": v for m in network.loras for k, v in m.state_dict().items()}
    ema = trainer.ema.state_dict()
    assert len(network.loras) > 0 and set(loaded) == set(ema)  # every LoKr module rebuilt from the Hub's file
    for key, value in ema.items():  # (alpha is a stored buffer; with full_matrix LoKr rebuilds its scale)
        stored = weights[key].dtype if key in weights else value.dtype  # the file's dtype (bf16 for a bf16 export)
        assert key.endswith(".alpha") or torch.equal(loaded[key], value.to(stored).to(loaded[key].dtype)), key
    trained = {m.lora_name: m for m in trainer.model.network.loras}
    assert all(m.scale == trained[m.lora_name].scale for m in network.loras)
    assert hub_server.state.token not in repo.read("README.md").decode()
