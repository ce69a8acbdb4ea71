"""The training loop and its assembly. Knows nothing of Ray: the orchestrator supplies `Hooks`."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable

import torch

from relay_train import checkpoint as ckpt
from relay_train.artifacts import adapter_names, base_model_name, run_name
from relay_train.data.buckets import Bucket, BucketBatchSampler
from relay_train.config import TrainConfig
from relay_train.data.dataset import BucketTensors, EncodedDataset, UnusableBatchError
from relay_train.data.encode import encode_dataset
from relay_train.hold import Hold
from relay_train.model import AdapterModel, build_adapter_model, compute_dtype, pick_device, resolve_model_path
from relay_train.nonfinite import NonFiniteError, StepGuard, nonfinite_stop, nonfinite_tensors
from relay_train.optim import AdapterEMA, build_scheduler
from relay_train.parallel import GradientSync, Update, build_update, shard_of
from relay_train.resume import apply_learning_rate, check_resume, continue_from_init_lora, restore_newest_loadable, resume_point
from relay_train.step import train_step

log = logging.getLogger(__name__)


@dataclass
class StepReport:
    step: int
    total_steps: int
    loss: float  # mean over the micro-batches since the last report
    lr: float
    epoch: int
    steps_per_second: float
    grad_norm: float  # mean global L2 norm before clipping, over the same steps as loss


@dataclass
class Hooks:
    """What the caller (CLI, Ray worker, test) plugs in. Every rank calls every hook."""

    on_step: Callable[[StepReport], None] | None = None  # every `log_every` steps (a host sync)
    on_checkpoint: Callable[[int, Path | None], None] | None = None  # checkpoint-N complete (None off the writer)
    should_stop: Callable[[int], bool] | None = None  # True → checkpoint now and return


@dataclass
class FitResult:
    step: int
    total_steps: int
    stopped_early: bool
    last_checkpoint: Path | None
    exported: list[Path] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # one per on_step report


def total_train_steps(config: TrainConfig, batches_per_epoch: int) -> int:
    if config.max_train_steps > 0:
        return config.max_train_steps
    return config.num_train_epochs * math.ceil(batches_per_epoch / config.gradient_accumulation_steps)


def adapter_metadata(config: TrainConfig, step: int) -> dict[str, str]:
    """safetensors metadata: what a loader needs to rebuild the network, and the model spec. As SimpleTuner
    writes it: the LyCORIS file's JSON as written, and `global_step` (what its init_lora reads); `step` too."""
    return {
        "format": "pt",
        "lycoris_config": json.dumps(config.lycoris.raw()),
        "global_step": str(step),
        "step": str(step),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v3-medium/lycoris-lokr",
        "modelspec.implementation": "lycoris",
        "modelspec.title": run_name(config),
        "base_model": base_model_name(config.pretrained_model_name_or_path),
    }


def export_dtype(config: TrainConfig) -> torch.dtype:
    """adapter_export_dtype: auto writes bf16 for mixed_precision bf16, as SimpleTuner does (half the size)."""
    if config.adapter_export_dtype == "auto":
        return torch.bfloat16 if config.mixed_precision == "bf16" else torch.float32
    return torch.bfloat16 if config.adapter_export_dtype == "bf16" else torch.float32


class Trainer:
    def __init__(
        self,
        config: TrainConfig,
        model: AdapterModel,
        dataset: EncodedDataset,
        sampler: BucketBatchSampler,
        store: ckpt.CheckpointIO,
        device: torch.device,
        hooks: Hooks | None = None,
        log_every: int = 10,
        rank: int = 0,
        world_size: int = 1,
        update: Update | None = None,
    ):
        """`sampler` yields global batches (train_batch_size × world_size); this rank trains on its share.
        Every rank keeps an identical replica of the adapter, optimizer and RNG; rank 0 alone writes.
        `update` does backward, the sum over ranks, clipping and the step (relay_train/parallel.py's
        `build_update`: "ddp" all-reduces gradients, overlapped with backward; "deepspeed" partitions the
        optimizer state, ZeRO-2 in relay_train/zero.py). None is plain ddp with the default sync."""
        self.config, self.model, self.dataset, self.sampler, self.store = config, model, dataset, sampler, store
        self.rank, self.world_size, self.is_writer = rank, world_size, rank == 0
        self.device, self.dtype = device, compute_dtype(config, device)
        self.hooks, self.log_every = hooks or Hooks(), log_every
        self.params = model.trainable_parameters()
        self.total_steps = total_train_steps(config, sampler.batches_per_epoch())
        # Backward, gradient reduction, clipping and the optimizer step, one interface for every strategy.
        self.update = update if update is not None else build_update("ddp", world_size, config, model.network, self.params)
        self.optimizer = self.update.optimizer  # the scheduler drives its lr
        self.scheduler = build_scheduler(config, self.optimizer, self.total_steps)
        self.ema = AdapterEMA(model.network, config.ema_decay) if config.use_ema else None
        # Non-finite steps (relay_train/nonfinite.py): undone on the device under policy skip, counted in
        # `nonfinite` (not yet read by the host, in a row) and read at the loop's existing host syncs.
        self.guard = StepGuard(self.optimizer, self.params, undo=config.nonfinite_policy == "skip", use_loss=world_size == 1)
        self.nonfinite = torch.zeros(2, device=device)
        self.nonfinite_total = 0
        self.saving = False  # a checkpoint is being gathered or written (the CLI's second Ctrl-C asks)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.resumed_at: list[int] = []  # every step this run resumed at, carried through checkpoints
        self.empty_prompt = (dataset.empty_prompt_embeds, dataset.empty_pooled_embeds)

    # -- state -------------------------------------------------------------------------------
    def payload(self, optimizer_state: dict) -> ckpt.CheckpointPayload:
        return ckpt.CheckpointPayload(
            step=self.step,
            adapter=self.adapter_tensors(),
            adapter_metadata=adapter_metadata(self.config, self.step),
            ema=self.ema.state_dict() if self.ema else None,
            optimizer=optimizer_state,
            scheduler=self.scheduler.state_dict(),
            rng=ckpt.capture_rng(self.generator),
            training_state={
                "step": self.step,
                "total_steps": self.total_steps,
                "sampler": self.sampler.state_dict(),
                "world_size": self.world_size,
                "resumed_at": self.resumed_at,
                "nonfinite_steps": self.nonfinite_total,
                "saved_at": time.time(),
            },
            config_json=self.config.resolved_json(),
        )

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.model.network.state_dict().items()}

    def restore(self, folder: Path) -> None:
        """Continue from a checkpoint, after checking this run may (relay_train/resume.py): refused config
        changes are one CheckpointError listing them all; allowed and warned ones are applied and logged."""
        state = ckpt.read_checkpoint(folder)
        lr_changed = check_resume(self.config, self.total_steps, folder, state)
        sampler = state.training_state.get("sampler")
        try:
            self.model.network.load_state_dict(state.adapter)
            if self.ema is not None:
                if state.ema is None:
                    raise ckpt.CheckpointError(f"{folder}: use_ema is on but the checkpoint has no EMA adapter")
                self.ema.load_state_dict(state.ema)
            self.update.load_consolidated_state_dict(state.optimizer)  # after the adapter (ZeRO refreshes from it)
            self.scheduler.load_state_dict(state.scheduler)
            if not isinstance(sampler, dict):
                raise TypeError(f"{ckpt.TRAINING_STATE} has no sampler state")
            self.sampler.load_state_dict(sampler)
            ckpt.restore_rng(state.rng, self.generator)
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
            if isinstance(exc, ckpt.CheckpointError):
                raise
            raise ckpt.CheckpointUnloadableError(
                f"{folder}: its state does not fit this run ({type(exc).__name__}: {str(exc)[:300]})"
            ) from exc
        if lr_changed:
            apply_learning_rate(self.config, self.optimizer, self.scheduler)
        self.step = state.step
        self.resumed_at = [*state.training_state.get("resumed_at", []), self.step]
        self.nonfinite_total = int(state.training_state.get("nonfinite_steps", 0))
        log.info("resumed from %s at step %d/%d", folder, self.step, self.total_steps)

    def save(self) -> Path | None:
        """Every rank takes part (ZeRO-2 gathers the state's slices); rank 0 writes. Refuses (NonFiniteError,
        on every rank alike) to write an adapter or EMA holding NaN/inf. A save is a host sync already, so
        the non-finite counters are read here too."""
        folder = None
        self.saving = True
        try:
            self.check_nonfinite(*self.nonfinite.tolist())
            self.require_finite_state(f"checkpoint-{self.step} not written")
            optimizer_state = self.update.consolidated_state_dict()
            if self.is_writer:
                folder = self.store.save(self.payload(optimizer_state))
                log.info("checkpoint %s written", folder)
        finally:
            self.saving = False
        if self.hooks.on_checkpoint:
            self.hooks.on_checkpoint(self.step, folder)
        return folder

    @torch.no_grad()
    def require_finite_state(self, what: str) -> None:
        """NonFiniteError unless the adapter and its EMA are finite. One host sync: call where one is paid."""
        groups = [[p.detach().float() for p in self.params], list(self.ema.shadow.values()) if self.ema else []]
        if all(bool(torch.isfinite(torch.stack(torch._foreach_norm(g))).all()) for g in groups if g):
            return
        names = nonfinite_tensors({k: v.detach().cpu() for k, v in self.model.network.state_dict().items()})
        names += [f"EMA {n}" for n in nonfinite_tensors(self.ema.state_dict() if self.ema else {})]
        raise NonFiniteError(
            f"{what}: the adapter holds NaN or inf ({len(names)} tensor(s), e.g. "
            f"{', '.join(names[:3]) or 'a norm that overflows'}); the earlier checkpoints are intact"
        )

    def check_nonfinite(self, unread: float, in_a_row: float) -> None:
        """Act on the non-finite counters the host just read (policy: nonfinite_policy, max_nonfinite_steps)."""
        if not unread:
            return
        self.nonfinite[0] = 0
        self.nonfinite_total += int(unread)

        def where() -> str:
            last = self.store.latest() if self.is_writer else None
            return f"the newest checkpoint is {last}" if last else "no checkpoint of this run is kept"

        if stop := nonfinite_stop(self.config.nonfinite_policy, self.config.max_nonfinite_steps, self.step, unread, in_a_row):
            raise NonFiniteError(stop.format(where=where()))
        log.warning(
            "step %d: %d non-finite step(s) skipped since the last report (%d in this run, %d in a row now)",
            self.step,
            int(unread),
            self.nonfinite_total,
            int(in_a_row),
        )

    # -- loop ----------------------------------------------------------------------------------
    def optimizer_step(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """gradient_accumulation_steps micro-batches, clip, step; returns the mean loss, the gradient norm
        before clipping, and whether the step was finite (tensors: no sync). A non-finite step's update
        is undone on the device under nonfinite_policy skip (relay_train/nonfinite.py)."""
        accum = self.config.gradient_accumulation_steps
        loss_sum = torch.zeros((), device=self.device)
        for _ in range(accum):
            bucket, indices, batch = self.next_batch()
            share = shard_of(len(indices), self.rank, self.world_size)
            loss = train_step(
                self.model.transformer,
                batch,
                self.empty_prompt,
                self.generator,
                shift=self.config.flow_schedule_shift,
                caption_dropout=self.config.caption_dropout_probability,
                device=self.device,
                dtype=self.dtype,
                share=share,
            )
            if share.stop > share.start:  # a partial global batch can leave a rank nothing to do
                # weight by this rank's share so the sum over ranks is the global batch's mean
                self.update.backward((share.stop - share.start) / len(indices) / accum * loss)
                loss_sum += loss.detach()
            else:
                self.update.backward(None)  # ZeRO reduces inside backward: every rank takes part
        snapshot = self.guard.before()
        grad_norm = self.update.step()
        ok = self.guard.after(snapshot, loss_sum, grad_norm)
        bad = (~ok).to(self.nonfinite.dtype)
        self.nonfinite = torch.stack([self.nonfinite[0] + bad, (self.nonfinite[1] + 1) * bad])  # unread, in a row
        self.scheduler.step()
        self.update.zero_grad()
        self.step += 1
        if self.ema is not None and self.step % self.config.ema_update_interval == 0:
            self.ema.update(self.model.network)
        return loss_sum / accum, grad_norm, ok

    def next_batch(self) -> tuple[Bucket, list[int], BucketTensors]:
        """The sampler's next batch, read from the caches. A batch none of whose samples can be read (every
        cache entry of its bucket corrupt: see EncodedDataset) is passed over, the same on every rank."""
        for _ in range(self.sampler.batches_per_epoch() + 1):
            bucket, indices = self.sampler.next_batch()
            try:
                return bucket, indices, self.dataset.batch(bucket, indices)
            except UnusableBatchError as exc:
                log.warning("step %d: batch passed over: %s", self.step + 1, exc)
        raise ValueError(
            "no batch of a whole epoch could be read: the caches are corrupt (see the warnings above; the "
            "bad entries were removed): run again, or `relay precompute`, to encode them anew"
        )

    def fit(self) -> FitResult:
        result = FitResult(step=self.step, total_steps=self.total_steps, stopped_early=False, last_checkpoint=None)
        # loss and grad norm sums over the finite steps since the last report, and their count
        window = torch.zeros(3, device=self.device)
        one = torch.ones((), device=self.device)
        window_start, t0, saved_at = self.step, time.perf_counter(), None
        hold = Hold.from_env()  # a test's (or a debugging person's) hold at a chosen step; normally None
        while self.step < self.total_steps:
            if hold is not None:
                hold.wait(self.step)
            loss, grad_norm, ok = self.optimizer_step()
            step_values = torch.stack([loss.to(window.device), grad_norm.to(window.device).reshape(()), one])
            window += torch.where(ok.to(window.device), step_values, torch.zeros_like(step_values))
            if self.step % self.log_every == 0 or self.step == self.total_steps:
                elapsed = time.perf_counter() - t0
                loss_sum, norm_sum, finite, unread, in_a_row = torch.cat([window, self.nonfinite]).tolist()  # the one host sync
                self.check_nonfinite(unread, in_a_row)
                mean_loss, mean_norm = (loss_sum / finite, norm_sum / finite) if finite else (math.nan, math.nan)
                report = StepReport(
                    self.step,
                    self.total_steps,
                    mean_loss,
                    self.scheduler.get_last_lr()[0],
                    self.sampler.epoch,
                    (self.step - window_start) / max(elapsed, 1e-9),
                    mean_norm,
                )
                result.losses.append(report.loss)
                if self.hooks.on_step:
                    self.hooks.on_step(report)
                window.zero_()
                window_start, t0 = self.step, time.perf_counter()
            if self.step % self.config.checkpointing_steps == 0 or self.step == self.total_steps:
                result.last_checkpoint, saved_at = self.save(), self.step
            if self.step < self.total_steps and self.hooks.should_stop and self.hooks.should_stop(self.step):
                if saved_at != self.step:
                    result.last_checkpoint, saved_at = self.save(), self.step
                result.stopped_early = True
                break
        result.step = self.step
        if not result.stopped_early and self.is_writer:
            result.exported = self.export(Path(self.config.output_dir))
        return result

    def export(self, out_dir: Path) -> list[Path]:
        """The final adapter and its EMA twin as single safetensors files, as the model card ships them."""
        adapter, ema = self.adapter_tensors(), self.ema.state_dict() if self.ema else None
        bad = nonfinite_tensors(adapter) + [f"EMA {n}" for n in nonfinite_tensors(ema or {})]
        if bad:  # never reached when every save checked the state; the last guard before users get a file
            raise NonFiniteError(f"export refused: {len(bad)} adapter tensor(s) hold NaN or inf ({', '.join(bad[:3])})")
        names = adapter_names(run_name(self.config))
        paths = ckpt.save_adapters(
            adapter,
            ema,
            adapter_metadata(self.config, self.step),
            out_dir / names[0],
            out_dir / names[1],
            dtype=export_dtype(self.config),
        )
        log.info("exported %s", ", ".join(str(p) for p in paths))
        return paths


def build_trainer(
    config: TrainConfig,
    hooks: Hooks | None = None,
    device: torch.device | None = None,
    rank: int = 0,
    world_size: int = 1,
    store: ckpt.CheckpointIO | None = None,
    resume_from: Path | None = None,
    global_workers: int | None = None,
    strategy: str = "ddp",
    gradient_sync: GradientSync | None = None,
) -> Trainer:
    """Data first (then its encoders are freed), then the quantized transformer + LoKr, then state:
    from `resume_from` when given (the orchestrator's checkpoint), else per resume_from_checkpoint.
    With world_size > 1 the torch.distributed group must exist: rank 0 plans and encodes the data for all.

    The global batch is train_batch_size × global_workers (default: world_size). An elastic run fixes
    global_workers at its maximum, so a smaller group splits the same global batch over fewer ranks and
    the batch, the schedule and the sampler are unchanged by a resize."""
    device = device or pick_device()
    model_path = resolve_model_path(config.pretrained_model_name_or_path)
    dataset = encode_dataset(config, model_path, device, compute_dtype(config, device), rank, world_size)
    # The sampler deals global batches; each rank trains on its share (see Trainer).
    sampler = BucketBatchSampler(
        dataset.bucket_sizes(),
        config.train_batch_size * (global_workers or world_size),
        config.seed,
        keep_partial_batches=config.disable_bucket_pruning,
    )
    model = build_adapter_model(config, model_path, device, seed=config.seed)
    update = build_update(strategy, world_size, config, model.network, model.trainable_parameters(), gradient_sync)
    store = store or ckpt.LocalCheckpointStore(Path(config.output_dir), keep=ckpt.keep_count(config.checkpoints_total_limit))
    trainer = Trainer(
        config,
        model,
        dataset,
        sampler,
        store,
        device,
        hooks,
        rank=rank,
        world_size=world_size,
        update=update,
    )
    folder = resume_from or resume_point(config, store)
    if folder is not None:
        fallback = resume_from is None and config.resume_from_checkpoint == "latest"
        restore_newest_loadable(trainer, folder, store if fallback else None)
    elif config.init_lora is not None:
        continue_from_init_lora(trainer, config)
    return trainer
