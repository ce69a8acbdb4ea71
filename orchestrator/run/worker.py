"""What every Ray Train worker runs: the relay_train Trainer with Ray's hooks plugged in."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import ray.train
import ray.train.torch
from ray.train import Checkpoint, CheckpointUploadMode

from relay_train import checkpoint as ckpt
from relay_train.config import TrainConfig, load_config
from relay_train.parallel import GradientSync
from relay_train.progress import ProgressDisplay
from relay_train.threads import size_threads
from relay_train.trainer import Hooks, StepReport, build_trainer

from orchestrator.core import redact
from orchestrator.core.cluster import assigned_cpus
from orchestrator.core.failure import Fatal, decide
from orchestrator.core.ledger import EventType
from orchestrator.run.preemption import PreemptionWatch
from orchestrator.run.steward import get_steward
from orchestrator.core.store import RunStorage
from relay_train.logs import configure_logging
from relay_train.safe_write import make_dir, remove_tree

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    """What the driver tells every worker, built by launch.worker_spec and pickled by Ray into each worker
    process (Ray Train wants a dict for train_loop_config: it travels as {"spec": WorkerSpec}). No field
    has a default here: the defaults are ClusterConfig's, and a spec is always built from one."""

    config_path: str  # absolute: workers start in Ray's session folder
    overrides: dict[str, Any]  # --set KEY=VALUE on top of the config file
    working_dir: str  # the job's directory: the config's relative paths mean this one
    storage: RunStorage = field(compare=False)  # the run's storage and name (where an emergency checkpoint is parked)
    upload_mode: Literal["async", "sync"]  # async: Ray uploads a checkpoint while the loop goes on
    preemption_check_steps: int  # steps between the barriers that check for a preemption notice (0: never)
    global_workers: int  # the global batch is sized for this many workers (elastic: the most)
    strategy: Literal["ddp", "deepspeed"]  # deepspeed: ZeRO-2 reduces the gradients itself
    gradient_bucket_mb: float  # ddp: MiB of gradients per all-reduce
    gradient_sync_dtype: Literal["fp32", "bf16"]  # ddp: what the all-reduce sends


class CheckpointReporter:
    """on_checkpoint hook: hand checkpoint-N to Ray, which uploads it to storage_path and keeps the newest N.

    `ray.train.report` is a barrier: every rank calls it at the same steps; only the writer passes a
    checkpoint. With ASYNC upload the loop continues while Ray copies the folder, then deletes it.
    """

    def __init__(self, upload_mode: str, steward=None):
        self.mode = CheckpointUploadMode.ASYNC if upload_mode == "async" else CheckpointUploadMode.SYNC
        self.steward = steward
        self.emergency = False  # set by PreemptionWatch: the next checkpoint is uploaded before report returns
        self.last: tuple[int, float] | None = None  # (step, clock) at the previous checkpoint

    def __call__(self, step: int, folder: Path | None) -> None:
        now = time.perf_counter()
        metrics = {"step": step}
        if self.last is not None and step > self.last[0]:
            metrics["steps_per_second"] = (step - self.last[0]) / (now - self.last[1])  # since the last checkpoint
        self.last = (step, now)
        if folder is None:
            ray.train.report(metrics, checkpoint=None)
            return
        mode = CheckpointUploadMode.SYNC if self.emergency else self.mode
        ray.train.report(
            metrics,
            checkpoint=Checkpoint.from_directory(str(folder)),
            checkpoint_dir_name=folder.name,
            checkpoint_upload_mode=mode,
            delete_local_checkpoint_after_upload=True,
        )


@contextlib.contextmanager
def restored_checkpoint():
    """The latest checkpoint Ray committed for this run, as a local folder (downloaded from S3 if need be)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as folder:
        yield Path(folder)  # read_checkpoint verifies it against its manifest before anything is loaded


def enter_job_directory(path: str) -> None:
    """Ray Train starts workers in its own session folder; the config's relative paths (model, data,
    output_dir) mean the job's directory. Where that folder is not on this node, paths must be absolute."""
    if Path(path).is_dir():
        os.chdir(path)
    else:
        log.warning("job directory %s is not on this node: relative config paths resolve from %s", path, os.getcwd())


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train's entry point on every rank, given {"spec": WorkerSpec}. An error is told to the steward
    (the driver shows it, the webhook hears it) before Ray sees it and restarts the group."""
    spec: WorkerSpec = loop_config["spec"]
    try:
        train_worker(spec)
    except Exception as exc:
        steward = get_steward(spec.storage.run_name)
        if steward is not None:
            rank = ray.train.get_context().get_world_rank()
            text = redact.redact(
                f"rank {rank} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            )
            if isinstance(decision := decide(exc), Fatal):  # a restart would meet it again: the driver ends the run
                steward.fatal.remote(int(decision.code), redact.redact(str(exc)[:2000]))
            steward.record.remote(EventType.WARNING, message=text)
        raise


def train_worker(spec: WorkerSpec) -> None:
    configure_logging()
    enter_job_directory(spec.working_dir)
    config = load_config(spec.config_path, spec.overrides)
    redact.install(redact.secret_values(config))
    size_threads(config.cpu_threads, assigned_cpus(), who="training worker")
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    staging = staging_dir(spec.storage.run_name, rank)
    steward = get_steward(spec.storage.run_name)
    reporter = CheckpointReporter(spec.upload_mode, steward)
    watch = PreemptionWatch(spec.preemption_check_steps, reporter, steward, rank)
    strategy = spec.strategy  # deepspeed: ZeRO-2 reduces the gradients itself
    sync = GradientSync(bucket_mb=spec.gradient_bucket_mb, dtype=spec.gradient_sync_dtype)  # ddp's overlapped all-reduce
    hooks = Hooks(on_checkpoint=reporter, should_stop=watch)
    # Ray Train has set up the torch.distributed group: build_trainer's rank 0 plans and encodes the data for all
    with restored_checkpoint() as resume_from:
        trainer = build_trainer(
            config,
            hooks=hooks,
            device=ray.train.torch.get_device(),
            rank=rank,
            world_size=world_size,
            store=ckpt.LocalCheckpointStore(staging),
            resume_from=resume_from,
            global_workers=spec.global_workers,
            strategy=strategy,
            gradient_sync=sync,
        )
    if rank != 0:  # per-step metrics come from rank 0 alone, with no extra barrier
        result = trainer.fit()
    else:
        log.info("%d worker(s); %s", world_size, f"resumed at step {trainer.step}" if resume_from else "starting a new run")
        if steward is not None:
            steward.attempt.remote(trainer.step, world_size, trainer.total_steps, resumed=resume_from is not None)
        with ProgressDisplay(trainer.total_steps, start_step=trainer.step) as progress:
            hooks.on_step = progress if steward is None else StepForwarder(progress, steward, config, spec.global_workers)
            result = trainer.fit()
        if steward is not None and not result.stopped_early:
            steward.record.remote(
                EventType.EXPORTED,
                result.step,
                files=[str(p) for p in result.exported],
                node=ray.get_runtime_context().get_node_id(),
            )
    if watch.notice is not None:
        watch.after_emergency_checkpoint(spec.storage)


class StepForwarder:
    """on_step on rank 0: the progress display, and the metrics to the steward (W&B) without waiting."""

    def __init__(self, progress: ProgressDisplay, steward, config: TrainConfig, global_workers: int):
        self.progress, self.steward = progress, steward  # the global batch is sized for global_workers
        self.samples_per_step = config.train_batch_size * config.gradient_accumulation_steps * global_workers

    def __call__(self, report: StepReport) -> None:
        self.progress(report)
        self.steward.tick.remote(
            report.step,
            report.steps_per_second,
            {
                "loss": report.loss,
                "lr": report.lr,
                "grad_norm": report.grad_norm,
                "epoch": report.epoch,
                "steps_per_second": report.steps_per_second,
                "samples_per_second": report.steps_per_second * self.samples_per_step,
            },
        )


def staging_dir(run_name: str, rank: int) -> Path:
    """Where checkpoint-N waits for Ray's upload; Ray deletes each folder once it is in storage.

    Left-overs from an earlier attempt on this node are stale (what mattered reached storage, or its
    upload died with that attempt and the run resumes from the last committed one), so start empty.
    """
    folder = Path(tempfile.gettempdir()) / "relay-staging" / run_name / f"rank-{rank}"
    remove_tree(folder)
    return make_dir(folder, owned_below=tempfile.gettempdir())  # /tmp is shared: no link on the way is followed
