"""What every Ray Train worker runs: the relay_train Trainer with Ray's hooks plugged in."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import ray.train
import ray.train.torch
from ray.train import Checkpoint, CheckpointUploadMode

from relay_train import checkpoint as ckpt
from relay_train.config import TrainConfig, load_config
from relay_train.parallel import GradientSync
from relay_train.progress import ProgressDisplay
from relay_train.trainer import Hooks, StepReport, build_trainer

from orchestrator import redact
from orchestrator.preemption import PreemptionWatch
from orchestrator.steward import get_steward
from orchestrator.store import RunStorage
from relay_train.logs import configure_logging

log = logging.getLogger(__name__)


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
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(folder)), checkpoint_dir_name=folder.name,
                         checkpoint_upload_mode=mode, delete_local_checkpoint_after_upload=True)


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
    """Ray Train's entry point on every rank. An error is told to the steward (the driver shows it, the
    webhook hears it) before Ray sees it and restarts the group."""
    try:
        train_worker(loop_config)
    except Exception as exc:
        steward = get_steward(loop_config["run_name"])
        if steward is not None:
            rank = ray.train.get_context().get_world_rank()
            text = redact.redact(f"rank {rank} failed: {type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0][:300] if str(exc) else ''}")
            if (kind := fatal_kind(exc)) is not None:  # a restart would meet it again: the driver ends the run
                steward.fatal.remote(kind, redact.redact(str(exc)[:2000]))
            steward.record.remote("warning", message=text)
        raise


def fatal_kind(exc: BaseException) -> str | None:
    """Errors no restart can cure: "config" (a config or a checkpoint the run cannot follow) or "nonfinite"
    (NaN/inf past nonfinite_policy). None for everything else, which Ray's failure policy retries."""
    from relay_train.checkpoint import CheckpointError
    from relay_train.config import ConfigError
    from relay_train.nonfinite import NonFiniteError

    if isinstance(exc, NonFiniteError):
        return "nonfinite"
    if isinstance(exc, (ConfigError, CheckpointError)):
        return "config"
    return None


def train_worker(loop_config: dict) -> None:
    configure_logging()
    enter_job_directory(loop_config["working_dir"])
    config = load_config(loop_config["config_path"], loop_config["overrides"])
    redact.install(redact.secret_values(config))
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    staging = staging_dir(loop_config["run_name"], rank)
    steward = get_steward(loop_config["run_name"])
    reporter = CheckpointReporter(loop_config["upload_mode"], steward)
    watch = PreemptionWatch(loop_config["preemption_check_steps"], reporter, steward, rank)
    strategy = loop_config.get("strategy", "ddp")  # deepspeed: ZeRO-2 reduces the gradients itself
    sync = GradientSync(bucket_mb=loop_config.get("gradient_bucket_mb", 25.0),
                        dtype=loop_config.get("gradient_sync_dtype", "fp32"))  # ddp's overlapped all-reduce
    hooks = Hooks(on_checkpoint=reporter, should_stop=watch)
    if world_size > 1:
        fill_caches_once(config, rank)
    with restored_checkpoint() as resume_from:
        trainer = build_trainer(config, hooks=hooks, device=ray.train.torch.get_device(), rank=rank,
                                world_size=world_size, store=ckpt.LocalCheckpointStore(staging),
                                resume_from=resume_from, global_workers=loop_config["global_workers"],
                                strategy=strategy, gradient_sync=sync)
    if rank != 0:  # per-step metrics come from rank 0 alone, with no extra barrier
        result = trainer.fit()
    else:
        log.info("%d worker(s); %s", world_size, f"resumed at step {trainer.step}" if resume_from else "starting a new run")
        if steward is not None:
            steward.attempt.remote(trainer.step, world_size, trainer.total_steps, resumed=resume_from is not None)
        with ProgressDisplay(trainer.total_steps, start_step=trainer.step) as progress:
            hooks.on_step = (progress if steward is None else
                             StepForwarder(progress, steward, config, loop_config["global_workers"]))
            result = trainer.fit()
        if steward is not None and not result.stopped_early:
            steward.record.remote("exported", result.step, files=[str(p) for p in result.exported],
                                  node=ray.get_runtime_context().get_node_id())
    if watch.notice is not None:
        watch.after_emergency_checkpoint(RunStorage(**loop_config["storage"]))


class StepForwarder:
    """on_step on rank 0: the progress display, and the metrics to the steward (W&B) without waiting."""

    def __init__(self, progress: ProgressDisplay, steward, config: TrainConfig, global_workers: int):
        self.progress, self.steward = progress, steward  # the global batch is sized for global_workers
        self.samples_per_step = config.train_batch_size * config.gradient_accumulation_steps * global_workers

    def __call__(self, report: StepReport) -> None:
        self.progress(report)
        self.steward.tick.remote(report.step, report.steps_per_second, {
            "loss": report.loss, "lr": report.lr, "grad_norm": report.grad_norm, "epoch": report.epoch,
            "steps_per_second": report.steps_per_second,
            "samples_per_second": report.steps_per_second * self.samples_per_step})


def fill_caches_once(config: TrainConfig, rank: int) -> None:
    """Rank 0 encodes whatever the latent and text caches lack while the others wait, so N ranks do not
    each load the text encoders and encode the same entries. (For a big dataset run jobs/precompute.py
    first: this barrier waits as long as torch.distributed's timeout.)"""
    import torch.distributed as dist

    from relay_train.data.dataset import plan_dataset
    from relay_train.model import compute_dtype, resolve_model_path
    from relay_train.data.encode import build_missing

    if rank == 0:
        device, model_path = ray.train.torch.get_device(), resolve_model_path(config.pretrained_model_name_or_path)
        plan = plan_dataset(config, model_path)
        if not plan.complete:
            build_missing(plan, model_path, device, compute_dtype(config, device))
    dist.barrier()


def staging_dir(run_name: str, rank: int) -> Path:
    """Where checkpoint-N waits for Ray's upload; Ray deletes each folder once it is in storage.

    Left-overs from an earlier attempt on this node are stale (what mattered reached storage, or its
    upload died with that attempt and the run resumes from the last committed one), so start empty.
    """
    folder = Path(tempfile.gettempdir()) / "relay-staging" / run_name / f"rank-{rank}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder
