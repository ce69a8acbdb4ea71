"""Build and run the Ray Train job: TorchTrainer over the workers, checkpoints to storage_path."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from relay_train.config import ConfigError, TrainConfig, load_config
from relay_train.trainer import run_name as default_run_name

from orchestrator import redact
from orchestrator.cluster import ClusterConfig, storage_filesystem
from orchestrator.display import DriverDisplay
from orchestrator.ledger import EventType
from orchestrator.policy import keep_count
from orchestrator.resources import ResourceError, cluster_can_grow, connect, wait_until_it_fits
from orchestrator.store import SNAPSHOT, RunStorage

if TYPE_CHECKING:
    from orchestrator.worker import WorkerSpec

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
        raise ConfigError(
            [
                f"--resume_from_checkpoint none, but run {name!r} already exists in {cluster.storage_path}: "
                "set resume_from_checkpoint latest to continue it, or a new run_name (cluster config) to start over"
            ]
        )


def launch(config_path: str | Path, overrides: dict | None, cluster: ClusterConfig):
    """Run (or resume, when <storage_path>/<run_name> exists) the training job; returns Ray's Result.

    Everything that can be refused is checked before a worker starts: the config, storage, the resume
    policy, whether the request fits the cluster, and whether the run is already running."""
    import ray

    config = load_config(config_path, overrides)
    for note in config.mapping_notes():  # how SimpleTuner's semantics map here, and defaults that differ
        log.info("config: %s", note)
    if cluster.strategy == "deepspeed":  # before any worker starts: a recipe ZeRO-2 cannot run fails here
        from relay_train.zero import check_config

        if problems := check_config(config):
            raise ConfigError(problems, source=config_path)
    redact.install(redact.secret_values(config))
    name = cluster.run_name or default_run_name(config)
    check_storage(cluster)
    check_resume_policy(config, cluster, name)
    if not ray.is_initialized():
        connect()
    gpus = wait_until_it_fits(config, cluster, can_grow=cluster_can_grow(cluster))
    storage = RunStorage.from_cluster(cluster, name)
    lock = hold_run_lock(storage)  # a local storage_path: one launch per run on this machine, whichever cluster
    try:
        return run_on_ray(config, config_path, overrides, cluster, storage, gpus)
    finally:
        if lock is not None:
            lock.release()


def run_on_ray(
    config: TrainConfig,
    config_path: str | Path,
    overrides: dict | None,
    cluster: ClusterConfig,
    storage: RunStorage,
    validation_gpus: float,
):
    """The steward (ledger, progress, what follows each commit) starts first, on this node, then Ray Train
    fits; the steward is closed with the run's outcome whether training finished, stopped or failed."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from orchestrator.worker import train_loop_per_worker

    name, gpus = storage.run_name, validation_gpus
    fs, storage_path = storage_filesystem(cluster)
    steward = start_steward(storage, cluster, config, validation_gpus=gpus)
    steward.run_started.remote(
        world_size=cluster.num_workers, storage=storage.describe(), config=config_summary(config), hourly_cost=cluster.hourly_cost
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        torch_config=TorchConfig(timeout_s=cluster.collective_timeout_seconds),  # a collective's wait for a peer
        train_loop_config={"spec": worker_spec(config_path, overrides, cluster, storage)},  # Ray wants a dict
        scaling_config=ScalingConfig(
            num_workers=tuple(cluster.num_workers) if cluster.elastic else cluster.num_workers,
            use_gpu=cluster.use_gpu,
            resources_per_worker={"CPU": cluster.cpus_per_worker, **cluster.resources_per_worker},
            **({"elastic_resize_monitor_interval_s": cluster.elastic_resize_seconds} if cluster.elastic else {}),
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=keep_count(config.checkpoints_total_limit)),
            failure_config=FailureConfig(
                max_failures=cluster.max_failures, max_preemption_failures=cluster.max_preemption_failures
            ),
        ),
    )
    log.info("run %r: %s worker(s), storage %s", name, cluster.num_workers, storage.describe())
    display = DriverDisplay(lambda since: ray.get(steward.view.remote(since), timeout=10), storage.describe).start()
    stop = StopRequest(steward)
    try:
        with stop:
            result = fit_off_the_main_thread(trainer, lambda: display.fatal)
    except BaseException as exc:
        display.close()
        # a second Ctrl-C means now: the ledger's end is recorded, the services get seconds, not minutes
        wait = INTERRUPTED_FLUSH_SECONDS if isinstance(exc, KeyboardInterrupt) else FINAL_FLUSH_SECONDS
        final = (
            {"type": EventType.STOPPED, "signal": stop.signal}
            if isinstance(exc, KeyboardInterrupt)
            else {"type": EventType.FAILED, "error": redact.redact(f"{type(exc).__name__}: {str(exc)[:500]}")}
        )
        try:
            ray.get(steward.close.remote(final, timeout=wait), timeout=wait + 30)
        except ray.exceptions.GetTimeoutError:
            log.warning("the run's services did not finish within %d s; their queues are spooled where they can be", wait)
        raise
    step = (result.metrics or {}).get("step")
    if result.error:
        final = {"type": EventType.FAILED, "error": redact.redact(f"{type(result.error).__name__}: {str(result.error)[:500]}")}
    elif stop.signal is not None:
        final = {"type": EventType.STOPPED, "signal": stop.signal, **({"step": step} if step is not None else {})}
    else:
        final = {"type": EventType.COMPLETED, **({"step": step} if step is not None else {})}
    # the services finish what is queued: the final Hub push, the last validation, the webhook's queue
    ray.get(steward.close.remote(final, timeout=FINAL_FLUSH_SECONDS))
    display.close()
    result.stopped_by = stop.signal
    return result


FINAL_FLUSH_SECONDS = 300  # per service, at the end of the run (the webhook's own bound is shorter)
INTERRUPTED_FLUSH_SECONDS = 10  # after a second Ctrl-C


class FatalRunError(RuntimeError):
    """A worker met an error no restart can cure (a config or checkpoint the run cannot follow, NaN/inf
    past nonfinite_policy): the run ends instead of Ray retrying it."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def hold_run_lock(storage: RunStorage):
    """For a local storage_path, an exclusive lock on the run's folder for this process's life (released
    by the kernel however the process ends), so two local clusters never write one run. On S3 the
    cluster's named steward does this (start_steward)."""
    if not storage.is_local:
        return None
    from relay_train.checkpoint import RunLock, RunLockedError

    lock = RunLock(Path(storage.describe("relay")))
    try:
        return lock.acquire()
    except RunLockedError:
        holder = (Path(storage.describe("relay")) / RunLock.NAME).read_text().strip() or "another process"
        raise ResourceError(
            f"run {storage.run_name!r} in {storage.storage_path} is in use by another `relay launch` "
            f"({holder}); wait for it, stop it, or choose another run_name",
            retryable=False,
        ) from None


def fit_off_the_main_thread(trainer, fatal=lambda: None):
    """trainer.fit() on a helper thread, so that Ray Train installs no SIGINT handler of its own (it
    aborts the run at once, losing the steps since the last checkpoint) and the main thread's
    StopRequest decides what a signal does. `fatal()` returning {"kind", "message"} (a worker's error no
    restart can cure) ends the wait with a FatalRunError; ray.shutdown() then stops the workers."""
    import threading

    box: dict = {}

    def run() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as exc:  # handed to the main thread as is
            box["error"] = exc

    thread = threading.Thread(target=run, name="relay-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)  # short waits: signal handlers run between them
        if (error := fatal()) is not None:
            raise FatalRunError(error["kind"], error["message"])
    if "error" in box:
        raise box["error"]
    return box["result"]


class StopRequest:
    """Ctrl-C / SIGTERM at the driver: the first asks the workers, through the steward, to checkpoint at
    their next check and return (the run then resumes from it); a second one stops waiting at once (the
    newest committed checkpoint is intact)."""

    def __init__(self, steward):
        self.steward, self.signal, self._old = steward, None, {}

    def __enter__(self) -> StopRequest:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:
            log.error("second signal: not waiting for the checkpoint; the newest committed one is intact")
            raise KeyboardInterrupt
        self.signal = signum
        log.warning(
            "%s: checkpointing at the next step boundary, then stopping (again to stop at once)", signal.Signals(signum).name
        )
        self.steward.request_stop.remote()


def worker_spec(config_path: str | Path, overrides: dict | None, cluster: ClusterConfig, storage: RunStorage) -> WorkerSpec:
    """What every worker is told: the recipe and where it runs from, the run's storage, the cluster's knobs."""
    from orchestrator.worker import WorkerSpec

    return WorkerSpec(
        config_path=str(Path(config_path).resolve()),
        storage=storage,
        working_dir=os.getcwd(),
        overrides=overrides or {},
        upload_mode=cluster.upload_mode,
        preemption_check_steps=cluster.preemption_check_steps,
        global_workers=cluster.max_workers,
        strategy=cluster.strategy,
        gradient_bucket_mb=cluster.gradient_bucket_mb,
        gradient_sync_dtype=cluster.gradient_sync_dtype,
    )


def start_steward(storage: RunStorage, cluster: ClusterConfig, config: TrainConfig, validation_gpus: float = 0.0):
    """The run's steward actor, pinned to this (the head) node; a left-over one from a dead job is replaced."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from orchestrator.steward import RunSteward, get_steward, steward_name

    old = get_steward(storage.run_name)
    if old is not None:  # a steward lives as long as its job's driver: one that answers means the run is on
        try:
            ray.get(old.ready.remote(), timeout=10)
            alive = True
        except (ray.exceptions.RayError, TimeoutError):
            alive = False
        if alive:
            raise ResourceError(
                f"run {storage.run_name!r} is already running on this cluster (another `relay "
                "launch` or submitted job); wait for it, stop it, or choose another run_name",
                retryable=False,
            )
        ray.kill(old)  # a left-over of a driver that is going away
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    steward = RunSteward.options(name=steward_name(storage.run_name), scheduling_strategy=here).remote(
        storage,
        config=config,
        wandb_dir=str(Path(config.output_dir).resolve()),
        working_dir=os.getcwd(),
        validation_options={
            "num_cpus": cluster.validation_cpus,
            "num_gpus": validation_gpus,
            "resources": cluster.validation_resources or None,
        },
        poll_seconds=cluster.steward_poll_seconds,
    )
    ray.get(steward.ready.remote())
    return steward


def config_summary(config: TrainConfig) -> dict:
    """What the ledger and the run-started message show of the recipe (no paths, no secrets)."""
    keys = (
        "model_family",
        "pretrained_model_name_or_path",
        "base_model_precision",
        "lora_type",
        "learning_rate",
        "lr_scheduler",
        "optimizer",
        "train_batch_size",
        "gradient_accumulation_steps",
        "max_train_steps",
        "checkpointing_steps",
        "checkpoints_total_limit",
        "validation_steps",
        "resolution",
        "mixed_precision",
        "use_ema",
        "seed",
    )
    return {k: getattr(config, k) for k in keys if hasattr(config, k)}


def run_job(config: str, cluster: str | None, sets: list[str], cluster_sets: list[str], verbose: bool = False) -> int:
    """A job's whole life in this process (jobs/train.py, KubeRay's entrypoint, relay launch): 0 completed,
    1 failed (retrying may help), 2 a configuration, storage or resource error (it cannot), 130/143 stopped
    by SIGINT/SIGTERM after a committed checkpoint (the same command resumes)."""
    import ray

    from relay_train.config.overrides import parse_overrides

    from orchestrator.cluster import load_cluster_config

    try:
        cluster_config = load_cluster_config(cluster, parse_overrides(cluster_sets))
        overrides = parse_overrides(sets)
        connect(verbose)
        result = launch(config, overrides, cluster_config)
    except ConfigError as exc:
        log.error("invalid config:\n%s", redact.redact(str(exc)))
        return 2
    except StorageError as exc:
        log.error("%s", exc)
        return 2
    except ResourceError as exc:
        log.error("cannot start: %s", exc)
        return 1 if exc.retryable else 2
    except FatalRunError as exc:
        log.error("run stopped: %s", exc)
        return 3 if exc.kind == "nonfinite" else 2  # as relay train: 3 NaN/inf, 2 config or checkpoint
    except KeyboardInterrupt:  # a second Ctrl-C (StopRequest): no new checkpoint waited for
        log.error("stopped at once; the newest committed checkpoint is intact, and the same command resumes")
        return 130
    finally:
        if ray.is_initialized():
            ray.shutdown()
    if result.error:
        log.error("run failed: %s", redact.redact(str(result.error)))
        return 1
    if result.stopped_by:
        return 128 + result.stopped_by
    return 0
