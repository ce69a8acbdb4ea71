"""On several ranks, rank 0 alone discovers, writes the shared index and report, deletes bad files and
encodes; the other ranks receive its plan. Two real processes over gloo run `encode_dataset`, the
function `build_trainer` calls on every rank (the Ray worker included)."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import torch

from relay_train.data.discovery import INDEX_NAME, REPORT_NAME
from support.ranks import run_ranks  # tests/support/

BAD = {"garbage.png": b"not an image at all", "empty.jpg": b""}


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.name, record.getMessage()))


def _rank_main(rank: int, world: int, port: int, config_path: str, out: str) -> None:
    """One rank: open the dataset as build_trainer does; save what it got and what this process logged."""
    import torch.distributed as dist

    from relay_train.config import load_config
    from relay_train.data.encode import encode_dataset

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    collect = _Collect()
    logger = logging.getLogger("relay_train")
    logger.setLevel(logging.INFO)
    logger.addHandler(collect)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        config = load_config(config_path)
        try:
            dataset = encode_dataset(
                config, Path(config.pretrained_model_name_or_path), torch.device("cpu"), torch.float32, rank, world
            )
        except Exception as exc:  # noqa: BLE001 - what each rank raised is the result
            result = {"error": f"{type(exc).__name__}: {exc}"}
        else:
            buckets = {bucket: [(r.backend, r.latent, r.text) for r in refs] for bucket, refs in dataset.buckets.items()}
            bucket, refs = next(iter(dataset.buckets.items()))
            batch = dataset.batch(bucket, list(range(len(refs))))
            result = {
                "buckets": buckets,
                "stats": vars(dataset.stats),
                "latents": batch.latents,
                "prompt_embeds": batch.prompt_embeds,
            }
        result["log"] = collect.records
        with open(Path(out) / f"rank{rank}.pkl", "wb") as f:
            pickle.dump(result, f)
    finally:
        dist.destroy_process_group()


def _run(config_path: Path, out: Path, free_port) -> list[dict]:
    out.mkdir()
    run_ranks(_rank_main, (2, free_port(), str(config_path), str(out)), nprocs=2)
    return [pickle.loads((out / f"rank{rank}.pkl").read_bytes()) for rank in range(2)]


def _dirty_copy(folder: Path, demo_data: Path, count: int = 6) -> None:
    folder.mkdir()
    for i in range(count):
        for suffix in (".png", ".txt"):
            shutil.copy(demo_data / f"{i:04d}{suffix}", folder / f"{i:04d}{suffix}")
    for name, data in BAD.items():
        (folder / name).write_bytes(data)
        (folder / name).with_suffix(".txt").write_text(f"caption for {name}")


def _data_records(result: dict) -> list[tuple[str, str]]:
    return [
        (name, message)
        for name, message in result["log"]
        if name in ("relay_train.data.plan", "relay_train.data.discovery", "relay_train.data.encode")
    ]


def test_rank_zero_discovers_deletes_and_encodes_once_and_both_ranks_get_its_plan(config_file, demo_data, tmp_path, free_port):
    folder = tmp_path / "dirty"
    _dirty_copy(folder, demo_data)
    config = config_file(data_dir=folder, delete_problematic_images=True)
    zero, one = _run(config, tmp_path / "results", free_port)

    assert "error" not in zero and "error" not in one, (zero.get("error"), one.get("error"))
    # one plan: the same samples in the same buckets, the same entries read, rank 0's encode counted on both
    assert zero["buckets"] == one["buckets"] and sum(map(len, zero["buckets"].values())) == 6
    assert zero["stats"] == one["stats"] == {"latents": 6, "text": 7, "failed": 0}  # 6 captions + the empty prompt
    assert torch.equal(zero["latents"], one["latents"]) and torch.equal(zero["prompt_embeds"], one["prompt_embeds"])
    # discovery, deletion and encoding ran in rank 0's process alone
    messages = " | ".join(m for _, m in _data_records(zero))
    assert "dataset: 6 samples" in messages and "deleted 2 problematic image(s)" in messages
    assert "precompute latents: 6/6" in messages
    assert _data_records(one) == []
    # the shared files are rank 0's: the report lists the files it deleted (a second discovery, after the
    # deletion, would have found 0 bad files and overwritten it)
    assert not any((folder / name).exists() for name in BAD)
    cache = Path(json.loads(config.read_text())["--output_dir"]) / "cache/vae/demo-images"
    report = json.loads((cache / REPORT_NAME).read_text())
    assert report["count"] == 2 and all(f["deleted"] for f in report["files"])
    index = json.loads((cache / INDEX_NAME).read_text())["files"]
    assert sorted(index) == sorted([*BAD, *(f"{i:04d}{s}" for i in range(6) for s in (".png", ".txt"))])
    assert [index[name]["error"] for name in BAD] == ["unreadable (not an image Pillow can identify)", "empty file"]


def test_an_error_on_rank_zero_reaches_the_other_ranks_at_once(config_file, tmp_path, free_port):
    empty = tmp_path / "empty"
    empty.mkdir()
    zero, one = _run(config_file(data_dir=empty), tmp_path / "results", free_port)
    assert zero["error"].startswith("ValueError: data backend 'demo-images': no usable images")
    assert one["error"] == zero["error"]  # rank 1 raises rank 0's error rather than wait for the timeout
    assert _data_records(one) == []


def test_a_plan_over_s3_travels_pickled_and_reads_the_same_entries(make_config, demo_data, s3_bucket, s3_endpoint):
    """What the broadcast carries: the plan with its caches' listing; its S3 stores reopen where it lands."""
    from relay_train.config import DataBackendConfig
    from relay_train.data.dataset import open_dataset
    from relay_train.data.encode import encode_dataset
    from relay_train.data.plan import plan_dataset

    client, bucket = s3_bucket
    for path in sorted(demo_data.iterdir()):
        client.put_object(Bucket=bucket, Key="demo/" + path.name, Body=path.read_bytes())
    config = make_config()
    s3 = DataBackendConfig(
        id="s3",
        type="aws",
        aws_bucket_name=bucket,
        aws_data_prefix="demo/",
        resolution=64,
        resolution_type="pixel_area",
        aws_region_name="us-east-1",
        aws_endpoint_url=s3_endpoint,
        cache_dir_vae="cache/vae",
    )
    config = config.model_copy(update={"data_backends": [s3, *config.data_backends[1:]]})
    model = Path(config.pretrained_model_name_or_path)
    encode_dataset(config, model, torch.device("cpu"), torch.float32)
    plan = plan_dataset(config, model)
    copy = pickle.loads(pickle.dumps(plan))
    assert copy.latent_caches[0].describe() == plan.latent_caches[0].describe()
    assert copy.latent_caches[0].describe().startswith(f"s3://{bucket}/cache/vae")
    sizes = [[cache.size_of(key) for key in plan.records] for cache in (plan.latent_caches[0], copy.latent_caches[0])]
    assert sizes[0] == sizes[1] and len(sizes[0]) == 12 and all(sizes[0])  # the listing travels: no LIST on arrival
    assert copy.buckets == plan.buckets and copy.records == plan.records and copy.captions == plan.captions
    original, received = open_dataset(plan), open_dataset(copy)
    for bucket_size, refs in plan.buckets.items():
        a, b = original.batch(bucket_size, list(range(len(refs)))), received.batch(bucket_size, list(range(len(refs))))
        assert torch.equal(a.latents, b.latents) and torch.equal(a.prompt_embeds, b.prompt_embeds)
