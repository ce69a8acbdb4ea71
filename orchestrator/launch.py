"""Build and run the Ray Train job: TorchTrainer over the workers, checkpoints to storage_path."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from relay_train.config import ConfigError, TrainConfig, load_config
from relay_train.trainer import run_name as default_run_name

from orchestrator.cluster import ClusterConfig, storage_filesystem

log = logging.getLogger(__name__)

SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2 writes it beside the run's checkpoints


def run_exists(cluster: ClusterConfig, name: str) -> bool:
    fs, root = storage_filesystem(cluster)
    if fs is None:
        return (Path(root) / name / SNAPSHOT).is_file()
    from pyarrow import fs as pafs

    return fs.get_file_info(f"{root}/{name}/{SNAPSHOT}").type == pafs.FileType.File


class StorageError(RuntimeError):
    """storage_path cannot be written: a missing bucket, wrong credentials, a read-only folder."""


def check_storage(cluster: ClusterConfig) -> None:
    """Write and delete a probe before any worker starts: a bad bucket should fail in seconds, not at
    the first checkpoint hours in."""
    fs, root = storage_filesystem(cluster)
    try:
        if fs is None:
            Path(root).mkdir(parents=True, exist_ok=True)
            probe = Path(root) / ".relay-write-probe"
            probe.write_bytes(b"ok")
            probe.unlink()
            return
        probe = f"{root}/.relay-write-probe"
        with fs.open_output_stream(probe) as out:
            out.write(b"ok")
        fs.delete_file(probe)
    except OSError as exc:
        raise StorageError(
            f"storage_path {cluster.storage_path} is not writable: {str(exc).splitlines()[0][:300]}. "
            "Check the bucket exists, the credentials (AWS_* environment or instance role) and storage_endpoint_url."
        ) from exc


def check_resume_policy(config: TrainConfig, cluster: ClusterConfig, name: str) -> None:
    """resume_from_checkpoint none on an existing run would silently continue it: refuse instead."""
    if config.resume_from_checkpoint == "none" and run_exists(cluster, name):
        raise ConfigError([
            f"--resume_from_checkpoint none, but run {name!r} already exists in {cluster.storage_path}: "
            "set resume_from_checkpoint latest to continue it, or a new run_name (cluster config) to start over"
        ])


def launch(config_path: str | Path, overrides: dict | None, cluster: ClusterConfig):
    """Run (or resume, when <storage_path>/<run_name> exists) the training job; returns Ray's Result."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.worker import train_loop_per_worker

    if cluster.strategy == "deepspeed":
        raise NotImplementedError("strategy deepspeed (ZeRO-2 over the adapter's optimizer state) is not built yet (issue 4)")
    config = load_config(config_path, overrides)
    name = cluster.run_name or default_run_name(config)
    check_storage(cluster)
    check_resume_policy(config, cluster, name)
    fs, storage_path = storage_filesystem(cluster)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config_path": str(Path(config_path).resolve()), "overrides": overrides or {},
                           "upload_mode": cluster.upload_mode, "working_dir": os.getcwd(), "run_name": name},
        scaling_config=ScalingConfig(num_workers=cluster.num_workers, use_gpu=cluster.use_gpu,
                                     resources_per_worker={"CPU": cluster.cpus_per_worker, **cluster.resources_per_worker}),
        run_config=RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=config.checkpoints_total_limit),
            failure_config=FailureConfig(max_failures=cluster.max_failures,
                                         max_preemption_failures=cluster.max_preemption_failures),
        ),
    )
    log.info("run %r: %d worker(s), storage %s", name, cluster.num_workers, cluster.storage_path)
    return trainer.fit()
