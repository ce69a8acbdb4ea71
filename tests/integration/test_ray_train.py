"""Ray Train V2 on a local cluster: data parallelism, S3 checkpoints through moto, resume by run name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pyarrow import fs as pafs
from support.checkpoints import max_abs_diff, result_adapter  # tests/support/
from support.ranks import train_ranks

from orchestrator.core.cluster import ClusterConfig, storage_filesystem
from orchestrator.run.launch import launch
from relay_train import checkpoint as ckpt
from relay_train.config import ConfigError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray(s3_endpoint):
    """One local Ray for the module; started after the S3 credentials are in the environment."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def test_two_workers_match_one_with_the_same_global_batch_and_resume_none_on_their_run_is_refused(
    local_ray, config_file, tmp_path, free_port
):
    """2 Ray workers × batch 2 end where one process × batch 4 does (the trainer on 1 rank without Ray);
    then asking for that run again with resume_from_checkpoint none is refused, not silently continued."""
    recipe = dict(max_train_steps=8, checkpointing_steps=8, optimizer="adamw", caption_dropout_probability=0.1)
    path = config_file(out="ddp2", train_batch_size=2, **recipe)
    cluster = ClusterConfig(num_workers=2, storage_path=str(tmp_path / "runs"), run_name="ddp2", max_failures=0)
    result = launch(path, {}, cluster)
    assert result.error is None
    adapters = {2: result_adapter(result)}
    one = config_file(out="ddp1", train_batch_size=4, **recipe)
    adapters[1] = train_ranks(one, tmp_path / "one.pt", free_port(), 1, global_workers=1)["adapter"]
    diff = max_abs_diff(adapters[1], adapters[2])
    moved = max((adapters[1][k]).abs().max().item() for k in adapters[1])
    print(f"2-worker vs 1-worker adapter: max abs diff {diff:.3e} (largest weight {moved:.3e})")
    assert diff < 1e-5

    with pytest.raises(ConfigError, match="already exists"):
        launch(path, {"resume_from_checkpoint": "none"}, cluster)


def test_a_ray_worker_runs_as_many_cpu_threads_as_cpus_it_was_given(local_ray):
    """The thread policy where the worker loop and the validation actor call it: Ray's num_cpus, rounded down, at least 1."""
    import ray

    def sized() -> tuple[int, int]:
        import torch

        from orchestrator.core.cluster import assigned_cpus
        from relay_train.threads import size_threads

        return size_threads(None, assigned_cpus()), torch.get_num_threads()

    share, two = ray.remote(num_cpus=0.5)(sized), ray.remote(num_cpus=2)(sized)
    assert ray.get([share.remote(), two.remote()], timeout=300) == [(1, 1), (2, 2)]


def test_s3_keeps_five_each_restores_and_a_resubmit_resumes(local_ray, config_file, s3_endpoint, s3_bucket, tmp_path):
    client, bucket = s3_bucket
    cluster = ClusterConfig(
        num_workers=1, storage_path=f"s3://{bucket}/runs", storage_endpoint_url=s3_endpoint, run_name="s3run", max_failures=0
    )
    path = config_file(max_train_steps=16, checkpointing_steps=2, checkpoints_total_limit=5)
    assert launch(path, {}, cluster).error is None

    listing = client.list_objects_v2(Bucket=bucket, Prefix="runs/s3run/")["Contents"]
    folders = sorted({o["Key"].split("/")[2] for o in listing if o["Key"].split("/")[2].startswith("checkpoint-")})
    assert folders == [f"checkpoint-{s}" for s in (10, 12, 14, 16, 8)]
    snapshot = json.loads(client.get_object(Bucket=bucket, Key="runs/s3run/checkpoint_manager_snapshot.json")["Body"].read())
    assert all(f in json.dumps(snapshot) for f in folders)  # Ray's record and S3 agree
    fs, root = storage_filesystem(cluster)
    for folder in folders:  # every kept checkpoint downloads and verifies against its manifest
        local = tmp_path / "dl" / folder
        local.mkdir(parents=True)
        pafs.copy_files(f"{root}/s3run/{folder}", str(local), source_filesystem=fs)
        assert ckpt.read_checkpoint(local).step == int(folder.split("-")[1])

    resumed = launch(path, {"max_train_steps": 20}, cluster)  # the same job again, 4 more steps
    assert resumed.error is None
    with resumed.checkpoint.as_directory() as folder:
        state = json.loads((Path(folder) / ckpt.TRAINING_STATE).read_text())
    assert state["step"] == 20 and state["resumed_at"] == [16]


KILL_DRIVER = """
import os, sys, time, tempfile
from pathlib import Path
import ray, ray.train
from ray.train import RunConfig, ScalingConfig, CheckpointConfig
from ray.train.torch import TorchTrainer
from orchestrator.core.cluster import ClusterConfig, storage_filesystem
from orchestrator.run.worker import CheckpointReporter
from relay_train import checkpoint as ckpt
import torch

def train_fn(config):
    reporter = CheckpointReporter("async")
    for step, pad_mib in ((1, 1), (2, 300)):
        folder = Path(tempfile.mkdtemp()) / f"checkpoint-{step}"
        payload = ckpt.CheckpointPayload(step, {"w": torch.full((4,), float(step))}, {"step": str(step)}, None,
                                         {}, {}, {}, {"step": step}, "{}")
        ckpt.write_checkpoint(folder, payload)
        with open(folder / "padding.bin", "wb") as fh:  # a big adapter: the upload takes a while
            fh.write(os.urandom(pad_mib << 20))
        reporter(step, folder)
        time.sleep(5)  # "training" between checkpoints: checkpoint-1 commits in this time
    time.sleep(600)  # killed before this ends

cluster = ClusterConfig(storage_path=sys.argv[1], storage_endpoint_url=sys.argv[2])
fs, path = storage_filesystem(cluster)
ray.init(address="local", num_cpus=2, include_dashboard=False)
TorchTrainer(train_fn, scaling_config=ScalingConfig(num_workers=1),
             run_config=RunConfig(name="kill", storage_path=path, storage_filesystem=fs,
                                  checkpoint_config=CheckpointConfig(num_to_keep=5))).fit()
"""


def test_a_kill_mid_upload_leaves_the_last_complete_checkpoint(local_ray, s3_endpoint, s3_bucket, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def restore_probe(config: dict) -> None:  # a closure, so Ray ships it by value
        from orchestrator.run.worker import restored_checkpoint

        with restored_checkpoint() as folder:  # verified against its manifest on the way
            Path(config["out"]).write_text(str(ckpt.read_checkpoint(folder).step) if folder else "none")

    client, bucket = s3_bucket
    script = tmp_path / "driver.py"
    script.write_text(KILL_DRIVER)
    repo = Path(__file__).resolve().parents[2]
    driver = subprocess.Popen(
        [sys.executable, str(script), f"s3://{bucket}/runs", s3_endpoint],
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:  # until checkpoint-1 is committed and checkpoint-2's upload has begun
            snapshot = client.list_objects_v2(Bucket=bucket, Prefix="runs/kill/checkpoint_manager").get("KeyCount", 0)
            uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
            listed = client.list_objects_v2(Bucket=bucket, Prefix="runs/kill/checkpoint-2/").get("KeyCount", 0)
            if snapshot and (listed or any("checkpoint-2" in u["Key"] for u in uploads)):
                break
            time.sleep(0.05)
        else:
            pytest.fail("checkpoint-2's upload never started")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the whole job: driver, Ray, worker, upload thread
        driver.wait(timeout=60)

    snapshot = client.get_object(Bucket=bucket, Key="runs/kill/checkpoint_manager_snapshot.json")["Body"].read()
    assert b"checkpoint-1" in snapshot and b"checkpoint-2" not in snapshot
    cluster = ClusterConfig(storage_path=f"s3://{bucket}/runs", storage_endpoint_url=s3_endpoint)
    fs, path = storage_filesystem(cluster)
    out = tmp_path / "restored.txt"
    TorchTrainer(
        restore_probe,
        train_loop_config={"out": str(out)},
        scaling_config=ScalingConfig(num_workers=1),
        run_config=RunConfig(name="kill", storage_path=path, storage_filesystem=fs),
    ).fit()
    assert out.read_text() == "1"


def test_a_missing_bucket_fails_before_any_worker_starts(s3_endpoint, config_file):
    from orchestrator.run.preflight import StorageError, check_storage

    cluster = ClusterConfig(storage_path="s3://no-such-bucket/runs", storage_endpoint_url=s3_endpoint)
    with pytest.raises(StorageError, match="no-such-bucket.*not writable") as err:
        launch(config_file(), {}, cluster)  # no Ray needed: it fails first
    assert "testing" not in str(err.value)  # the credentials never appear
    check_storage(ClusterConfig(storage_path=str(Path(config_file()).parent / "runs")))  # a local folder is made
