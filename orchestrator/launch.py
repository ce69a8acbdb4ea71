"""Build and run the Ray Train job: TorchTrainer over the workers, checkpoints to storage_path."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from relay_train.config import ConfigError, TrainConfig, load_config
from relay_train.trainer import run_name as default_run_name

from orchestrator import redact
from orchestrator.cluster import ClusterConfig, storage_filesystem
from orchestrator.store import SNAPSHOT, RunStorage

log = logging.getLogger(__name__)


def run_exists(cluster: ClusterConfig, name: str) -> bool:
    return RunStorage.from_cluster(cluster, name).exists(SNAPSHOT)


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
    """Run (or resume, when <storage_path>/<run_name> exists) the training job; returns Ray's Result.

    The steward (ledger, progress, what follows each commit) starts first, on this node, and is closed
    with the run's outcome whether training finished or failed."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.worker import train_loop_per_worker

    config = load_config(config_path, overrides)
    if cluster.strategy == "deepspeed":  # before any worker starts: a recipe ZeRO-2 cannot run fails here
        from relay_train.zero import check_config

        if problems := check_config(config):
            raise ConfigError(problems, source=config_path)
    redact.install(redact.secret_values(config))
    name = cluster.run_name or default_run_name(config)
    check_storage(cluster)
    check_resume_policy(config, cluster, name)
    fs, storage_path = storage_filesystem(cluster)
    if not ray.is_initialized():
        ray.init()
    storage = RunStorage.from_cluster(cluster, name)
    steward = start_steward(storage, cluster, config)
    steward.run_started.remote(world_size=cluster.num_workers, storage=storage.uri(), config=config_summary(config),
                               hourly_cost=cluster.hourly_cost)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config_path": str(Path(config_path).resolve()), "overrides": overrides or {},
                           "upload_mode": cluster.upload_mode, "working_dir": os.getcwd(), "run_name": name,
                           "preemption_check_steps": cluster.preemption_check_steps,
                           "global_workers": cluster.max_workers, "strategy": cluster.strategy,
                           "storage": storage.__getstate__()},
        scaling_config=ScalingConfig(num_workers=tuple(cluster.num_workers) if cluster.elastic else cluster.num_workers,
                                     use_gpu=cluster.use_gpu,
                                     resources_per_worker={"CPU": cluster.cpus_per_worker, **cluster.resources_per_worker},
                                     **({"elastic_resize_monitor_interval_s": cluster.elastic_resize_seconds}
                                        if cluster.elastic else {})),
        run_config=RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=config.checkpoints_total_limit),
            failure_config=FailureConfig(max_failures=cluster.max_failures,
                                         max_preemption_failures=cluster.max_preemption_failures),
        ),
    )
    log.info("run %r: %s worker(s), storage %s", name, cluster.num_workers, cluster.storage_path)
    try:
        result = trainer.fit()
    except BaseException as exc:
        ray.get(steward.close.remote({"type": "failed", "error": f"{type(exc).__name__}: {str(exc)[:500]}"}))
        raise
    if result.error:
        final = {"type": "failed", "error": f"{type(result.error).__name__}: {str(result.error)[:500]}"}
    else:
        step = (result.metrics or {}).get("step")
        final = {"type": "completed", **({"step": step} if step is not None else {})}
    # the services finish what is queued: the final Hub push, the last validation, the webhook's queue
    ray.get(steward.close.remote(final, timeout=FINAL_FLUSH_SECONDS))
    return result


FINAL_FLUSH_SECONDS = 300  # per service, at the end of the run


def start_steward(storage: RunStorage, cluster: ClusterConfig, config: TrainConfig):
    """The run's steward actor, pinned to this (the head) node; a left-over one from a dead job is replaced."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from orchestrator.steward import RunSteward, get_steward, steward_name

    old = get_steward(storage.run_name)
    if old is not None:
        ray.kill(old)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    steward = RunSteward.options(name=steward_name(storage.run_name), scheduling_strategy=here).remote(
        storage, config=config, wandb_dir=str(Path(config.output_dir).resolve()), working_dir=os.getcwd(),
        validation_resources=cluster.validation_resources,
        poll_seconds=cluster.steward_poll_seconds)
    ray.get(steward.ready.remote())
    return steward


def config_summary(config: TrainConfig) -> dict:
    """What the ledger and the run-started message show of the recipe (no paths, no secrets)."""
    keys = ("model_family", "pretrained_model_name_or_path", "base_model_precision", "lora_type", "learning_rate",
            "lr_scheduler", "optimizer", "train_batch_size", "gradient_accumulation_steps", "max_train_steps",
            "checkpointing_steps", "checkpoints_total_limit", "validation_steps", "resolution", "mixed_precision",
            "use_ema", "seed")
    return {k: getattr(config, k) for k in keys if hasattr(config, k)}


def run_job(config: str, cluster: str | None, sets: list[str], cluster_sets: list[str]) -> int:
    """A job's whole life in this process (jobs/train.py, KubeRay's entrypoint): 0 completed, 1 failed
    (retrying may help), 2 a configuration or storage error (it cannot)."""
    import ray

    from relay_train.cli import parse_overrides

    from orchestrator.cluster import load_cluster_config

    try:
        cluster_config = load_cluster_config(cluster, parse_overrides(cluster_sets))
        overrides = parse_overrides(sets)
        ray.init()  # inside a submitted job this joins its cluster; alone it starts a local one
        result = launch(config, overrides, cluster_config)
    except ConfigError as exc:
        log.error("invalid config:\n%s", exc)
        return 2
    except StorageError as exc:
        log.error("%s", exc)
        return 2
    if result.error:
        log.error("run failed: %s", result.error)
        return 1
    return 0
