"""Build and run the Ray Train job: TorchTrainer over the workers, checkpoints to storage_path."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from relay_train.config import ConfigError, TrainConfig, load_config
from relay_train.config.notes import config_summary
from relay_train.exit_codes import Exit, by_signal
from relay_train.artifacts import run_name as default_run_name
from relay_train.failures import known_failure

from orchestrator.core import redact
from orchestrator.core.cluster import ClusterConfig, storage_filesystem
from orchestrator.core.failure import FatalError
from orchestrator.run import preflight
from orchestrator.run.display import DriverDisplay
from orchestrator.core.ledger import EventType
from orchestrator.core.policy import keep_count
from orchestrator.run.resources import ResourceError, RunInUseError, cluster_can_grow, connect, wait_until_it_fits
from orchestrator.core.store import RunStorage

if TYPE_CHECKING:
    from orchestrator.run.worker import WorkerSpec

log = logging.getLogger(__name__)


def launch(config_path: str | Path, overrides: dict | None, cluster: ClusterConfig, verbose: bool = False):
    """Run (or resume, when <storage_path>/<run_name> exists) the training job; returns Ray's Result, or
    None when the run had already completed (nothing trained, nothing recorded).

    Everything that can be refused is checked before a worker starts (orchestrator.run.preflight): the
    config, the paths, storage, the resume, whether the request fits the cluster, and whether the run is
    already running. A refusal also reaches the run's webhooks, as one error-level line."""

    config = load_config(config_path, overrides)
    for note in config.mapping_notes():  # how SimpleTuner's semantics map here, and defaults that differ
        log.info("config: %s", note)
    redact.install(redact.secret_values(config))
    name = cluster.run_name or default_run_name(config)
    storage = RunStorage.from_cluster(cluster, name)
    try:
        decision = preflight.check_all(config, cluster, storage)
    except (ConfigError, FatalError) as exc:  # paths, storage, a resume the run cannot follow
        preflight.notify_refusal(config, name, exc)
        raise
    if decision.action == "done":
        log.info("%s", decision.message)
        return None
    # checked first, so a refused path is never created; then held like relay train's, until the run ends
    output_lock = hold_output_lock(config)
    try:
        return _run(config, config_path, overrides, cluster, storage, verbose)
    finally:
        output_lock.release()


def _run(
    config: TrainConfig,
    config_path: str | Path,
    overrides: dict | None,
    cluster: ClusterConfig,
    storage: RunStorage,
    verbose: bool,
):
    import ray

    try:
        if not ray.is_initialized():  # after the checks: a refusal or a finished run never waits for Ray
            connect(verbose)
        gpus, cluster = wait_until_it_fits(config, cluster, can_grow=cluster_can_grow(cluster))
    except (ConfigError, FatalError) as exc:  # a request the cluster cannot hold
        preflight.notify_refusal(config, storage.run_name, exc)
        raise
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

    from orchestrator.run.worker import train_loop_per_worker

    name, gpus = storage.run_name, validation_gpus
    fs, storage_path = storage_filesystem(cluster)
    steward = start_steward(storage, cluster, config, validation_gpus=gpus)
    before = ray.get(steward.view.remote(HISTORY), timeout=60)["count"]  # earlier jobs' events: not news now
    steward.run_started.remote(
        world_size=cluster.num_workers,
        storage=storage.describe(),
        config=config_summary(config),
        hourly_cost=cluster.hourly_cost,
        stall_seconds=cluster.stall_seconds,  # relay status reads it here, as the steward does
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
    display = DriverDisplay(lambda since: ray.get(steward.view.remote(since), timeout=10), storage.describe, since=before)
    display.start()
    stop = StopRequest(steward)
    try:
        with stop, ray_train_settings(cluster):
            result = fit_off_the_main_thread(trainer, lambda: display.fatal)
    except BaseException as exc:
        display.close()
        # a second Ctrl-C means now: the ledger's end is recorded, the services get seconds, not minutes
        wait = INTERRUPTED_FLUSH_SECONDS if isinstance(exc, KeyboardInterrupt) else FINAL_FLUSH_SECONDS
        final = (
            {"type": EventType.STOPPED, "signal": stop.signal}
            if isinstance(exc, KeyboardInterrupt)
            else {"type": EventType.FAILED, "error": redact.redact(preflight.refusal_line(exc)[:500])}
        )
        try:
            ray.get(steward.close.remote(final, timeout=wait), timeout=wait + 30)
        except ray.exceptions.GetTimeoutError:
            log.warning("the run's services did not finish within %d s; their queues are spooled where they can be", wait)
        raise
    step = (result.metrics or {}).get("step")
    if result.error:
        final = {"type": EventType.FAILED, "error": redact.redact(preflight.refusal_line(result.error)[:500])}
    elif stop.signal is not None:
        final = {"type": EventType.STOPPED, "signal": stop.signal, **({"step": step} if step is not None else {})}
    else:
        final = {"type": EventType.COMPLETED, **({"step": step} if step is not None else {})}
    # the services finish what is queued: the final Hub push, the last validation, the webhook's queue
    ray.get(steward.close.remote(final, timeout=FINAL_FLUSH_SECONDS))
    display.close()
    result.stopped_by = stop.signal
    return result


HISTORY = 1 << 62  # view(since=HISTORY): no events, only how many the ledger holds
FINAL_FLUSH_SECONDS = 300  # per service, at the end of the run (the webhook's own bound is shorter)
INTERRUPTED_FLUSH_SECONDS = 10  # after a second Ctrl-C


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
        raise RunInUseError(
            f"run {storage.run_name!r} in {storage.storage_path} is in use by another `relay launch` "
            f"({holder}); wait for it, stop it, or choose another run_name"
        ) from None


def hold_output_lock(config: TrainConfig):
    """The output_dir lock `relay train` holds (exports land there); RunInUseError when another run has it."""
    from relay_train.checkpoint import RunLock, RunLockedError

    try:
        return RunLock(Path(config.output_dir)).acquire()
    except RunLockedError as exc:
        raise RunInUseError(str(exc)) from None


@contextlib.contextmanager
def ray_train_settings(cluster: ClusterConfig):
    """The cluster keys that are Ray Train's own settings, in this process's environment while it fits:
    Ray Train reads them there when it starts its controller, and hands them on to the workers."""
    settings = cluster.ray_train_environment(os.environ)
    before = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def fit_off_the_main_thread(trainer, fatal=lambda: None):
    """trainer.fit() on a helper thread, so that Ray Train installs no SIGINT handler of its own (it
    aborts the run at once, losing the steps since the last checkpoint) and the main thread's
    StopRequest decides what a signal does. `fatal()` returning {"code", "message"} (a worker's error no
    restart can cure) ends the wait with a FatalError; ray.shutdown() then stops the workers."""
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
            raise FatalError(Exit(error["code"]), f"run stopped: {error['message']}")
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
    from orchestrator.run.worker import WorkerSpec

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

    from orchestrator.run.steward import RunSteward, get_steward, steward_name

    old = get_steward(storage.run_name)
    if old is not None:  # a steward lives as long as its job's driver: one that answers means the run is on
        try:
            ray.get(old.ready.remote(), timeout=10)
            alive = True
        except (ray.exceptions.RayError, TimeoutError):
            alive = False
        if alive:
            raise RunInUseError(
                f"run {storage.run_name!r} is already running on this cluster (another `relay "
                "launch` or submitted job); wait for it, stop it, or choose another run_name"
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


def run_job(config: str, cluster: str | None, sets: list[str], cluster_sets: list[str], verbose: bool = False) -> int:
    """A job's whole life in this process (jobs/train.py, KubeRay's entrypoint, relay launch); its exit
    codes are relay_train.exit_codes' (COMMANDS["relay launch"])."""
    import ray

    from relay_train.config.overrides import parse_overrides

    from orchestrator.core.cluster import load_cluster_config

    try:
        cluster_config = load_cluster_config(cluster, parse_overrides(cluster_sets))
        overrides = parse_overrides(sets)
        result = launch(config, overrides, cluster_config, verbose=verbose)
    except ConfigError as exc:
        log.error("invalid config:\n%s", redact.redact(str(exc)))
        return Exit.CONFIG
    except FatalError as exc:  # storage, resources, a worker's permanent error: decided, with its exit code
        log.error("%s", f"cannot start: {exc}" if isinstance(exc, ResourceError) else exc)
        return exc.code
    except KeyboardInterrupt:  # a second Ctrl-C (StopRequest): no new checkpoint waited for
        log.error("stopped at once; the newest committed checkpoint is intact, and the same command resumes")
        return Exit.SIGINT
    except Exception as exc:
        known = known_failure(exc)  # the one map from a failure to its exit code (relay_train/failures.py)
        if known is None:
            raise
        log.error("cannot run: %s", redact.redact(known.message))
        return known.code
    finally:
        if ray.is_initialized():
            ray.shutdown()
    if result is None:  # already completed: nothing trained
        return Exit.OK
    if result.error:
        log.error("run failed: %s", redact.redact(str(result.error)))
        return Exit.FAILED
    if result.stopped_by:
        return by_signal(result.stopped_by)
    return Exit.OK
