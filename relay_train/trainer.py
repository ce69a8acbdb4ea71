"""The training loop and its assembly. Knows nothing of Ray: the orchestrator supplies `Hooks`."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from relay_train import checkpoint as ckpt
from relay_train.buckets import BucketBatchSampler
from relay_train.config import TrainConfig
from relay_train.data import EncodedDataset, encode_dataset
from relay_train.model import AdapterModel, build_adapter_model, compute_dtype, pick_device, resolve_model_path
from relay_train.parallel import shard_of
from relay_train.optim import AdapterEMA, build_optimizer, build_scheduler, clip_gradients
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
    sync_gradients: Callable[[list[torch.nn.Parameter]], None] | None = None  # data parallel: sum over ranks


@dataclass
class FitResult:
    step: int
    total_steps: int
    stopped_early: bool
    last_checkpoint: Path | None
    exported: list[Path] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # one per on_step report


class ReplicatedUpdate:
    """Strategy ddp (and one process): every rank holds the whole optimizer; gradients are summed over
    ranks by `sync` (the orchestrator's all-reduce) before clipping and the step. The same interface as
    relay_train.zero.ZeroStage2, so the loop does not care which it has."""

    def __init__(self, config: TrainConfig, params: list[torch.nn.Parameter],
                 sync: Callable[[list[torch.nn.Parameter]], None] | None):
        self.params, self.sync = params, sync
        self.clip_method, self.clip_limit = config.grad_clip_method, config.max_grad_norm
        self.optimizer = build_optimizer(config, params)

    def backward(self, loss: torch.Tensor | None) -> None:
        if loss is not None:
            loss.backward()

    def step(self) -> torch.Tensor:
        """Sum over ranks, clip, step; returns the gradient norm before clipping (no host sync)."""
        if self.sync:
            self.sync(self.params)
        norm = clip_gradients(self.params, self.clip_method, self.clip_limit)
        self.optimizer.step()
        return norm

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def consolidated_state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_consolidated_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


def total_train_steps(config: TrainConfig, batches_per_epoch: int) -> int:
    if config.max_train_steps > 0:
        return config.max_train_steps
    return config.num_train_epochs * math.ceil(batches_per_epoch / config.gradient_accumulation_steps)


def adapter_metadata(config: TrainConfig, step: int) -> dict[str, str]:
    """safetensors metadata: what a loader needs to rebuild the network, and the model spec."""
    return {
        "format": "pt",
        "lycoris_config": json.dumps(config.lycoris.raw(), sort_keys=True),
        "step": str(step),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v3-medium/lycoris-lokr",
        "modelspec.implementation": "lycoris",
        "modelspec.title": run_name(config),
        "base_model": config.pretrained_model_name_or_path,
    }


def run_name(config: TrainConfig) -> str:
    return config.tracker_run_name or Path(config.output_dir).name or "relay"


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
        strategy: str = "ddp",
    ):
        """`sampler` yields global batches (train_batch_size × world_size); this rank trains on its share.
        Every rank keeps an identical replica of the adapter, optimizer and RNG; rank 0 alone writes.
        strategy "deepspeed" partitions the optimizer state and reduced gradients (ZeRO-2, relay_train/zero.py)."""
        self.config, self.model, self.dataset, self.sampler, self.store = config, model, dataset, sampler, store
        self.rank, self.world_size, self.is_writer = rank, world_size, rank == 0
        self.device, self.dtype = device, compute_dtype(config, device)
        self.hooks, self.log_every = hooks or Hooks(), log_every
        self.params = model.trainable_parameters()
        self.total_steps = total_train_steps(config, sampler.batches_per_epoch())
        # Backward, gradient reduction, clipping and the optimizer step, one interface for both strategies.
        if strategy == "deepspeed":
            from relay_train.zero import ZeroStage2

            self.update: ReplicatedUpdate | ZeroStage2 = ZeroStage2(config, model.network, self.params)
        elif strategy == "ddp":
            self.update = ReplicatedUpdate(config, self.params, self.hooks.sync_gradients)
        else:
            raise ValueError(f"strategy {strategy!r}: expected 'ddp' or 'deepspeed'")
        self.optimizer = self.update.optimizer  # the scheduler drives its lr
        self.scheduler = build_scheduler(config, self.optimizer, self.total_steps)
        self.ema = AdapterEMA(model.network, config.ema_decay) if config.use_ema else None
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
            training_state={"step": self.step, "total_steps": self.total_steps, "sampler": self.sampler.state_dict(),
                            "world_size": self.world_size, "resumed_at": self.resumed_at,
                            "saved_at": time.time()},
            config_json=self.config.resolved_json(),
        )

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.model.network.state_dict().items()}

    def restore(self, folder: Path) -> None:
        state = ckpt.read_checkpoint(folder)
        self.model.network.load_state_dict(state.adapter)
        if self.ema is not None:
            if state.ema is None:
                raise ckpt.CheckpointError(f"{folder}: use_ema is on but the checkpoint has no EMA adapter")
            self.ema.load_state_dict(state.ema)
        self.update.load_consolidated_state_dict(state.optimizer)  # after the adapter (ZeRO refreshes from it)
        self.scheduler.load_state_dict(state.scheduler)
        self.sampler.load_state_dict(state.training_state["sampler"])
        ckpt.restore_rng(state.rng, self.generator)
        self.step = state.step
        self.resumed_at = [*state.training_state.get("resumed_at", []), self.step]
        log.info("resumed from %s at step %d/%d", folder, self.step, self.total_steps)

    def save(self) -> Path | None:
        folder = None
        # every rank takes part (ZeRO-2 gathers the state's slices); rank 0 writes it
        optimizer_state = self.update.consolidated_state_dict()
        if self.is_writer:
            folder = self.store.save(self.payload(optimizer_state))
            log.info("checkpoint %s written", folder)
        if self.hooks.on_checkpoint:
            self.hooks.on_checkpoint(self.step, folder)
        return folder

    # -- loop ----------------------------------------------------------------------------------
    def optimizer_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """gradient_accumulation_steps micro-batches, clip, step; returns the mean loss and the gradient
        norm before clipping (tensors: no sync)."""
        accum = self.config.gradient_accumulation_steps
        loss_sum = torch.zeros((), device=self.device)
        for _ in range(accum):
            bucket, indices = self.sampler.next_batch()
            share = shard_of(len(indices), self.rank, self.world_size)
            loss = train_step(
                self.model.transformer, self.dataset.batch(bucket, indices), self.empty_prompt, self.generator,
                shift=self.config.flow_schedule_shift, caption_dropout=self.config.caption_dropout_probability,
                device=self.device, dtype=self.dtype, share=share,
            )
            if share.stop > share.start:  # a partial global batch can leave a rank nothing to do
                # weight by this rank's share so the sum over ranks is the global batch's mean
                self.update.backward((share.stop - share.start) / len(indices) / accum * loss)
                loss_sum += loss.detach()
            else:
                self.update.backward(None)  # ZeRO reduces inside backward: every rank takes part
        grad_norm = self.update.step()
        self.scheduler.step()
        self.update.zero_grad()
        self.step += 1
        if self.ema is not None and self.step % self.config.ema_update_interval == 0:
            self.ema.update(self.model.network)
        return loss_sum / accum, grad_norm

    def fit(self) -> FitResult:
        result = FitResult(step=self.step, total_steps=self.total_steps, stopped_early=False, last_checkpoint=None)
        window = torch.zeros(2, device=self.device)  # loss, grad norm sums since the last report
        window_start, t0, saved_at = self.step, time.perf_counter(), None
        while self.step < self.total_steps:
            loss, grad_norm = self.optimizer_step()
            window[0] += loss
            window[1] += grad_norm.to(window.device)
            if self.step % self.log_every == 0 or self.step == self.total_steps:
                elapsed = time.perf_counter() - t0
                mean_loss, mean_norm = (window / (self.step - window_start)).tolist()  # the one host sync
                report = StepReport(self.step, self.total_steps, mean_loss, self.scheduler.get_last_lr()[0],
                                    self.sampler.epoch, (self.step - window_start) / max(elapsed, 1e-9), mean_norm)
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
        out_dir.mkdir(parents=True, exist_ok=True)
        base = f"sd35-{run_name(self.config)}-lokr"
        paths = ckpt.save_adapters(self.adapter_tensors(), self.ema.state_dict() if self.ema else None,
                                   adapter_metadata(self.config, self.step),
                                   out_dir / f"{base}.safetensors", out_dir / f"{base}-ema.safetensors")
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
) -> Trainer:
    """Data first (then its encoders are freed), then the quantized transformer + LoKr, then state:
    from `resume_from` when given (the orchestrator's checkpoint), else per resume_from_checkpoint.

    The global batch is train_batch_size × global_workers (default: world_size). An elastic run fixes
    global_workers at its maximum, so a smaller group splits the same global batch over fewer ranks and
    the batch, the schedule and the sampler are unchanged by a resize."""
    device = device or pick_device()
    model_path = resolve_model_path(config.pretrained_model_name_or_path)
    dataset = encode_dataset(config, model_path, device, compute_dtype(config, device))
    # The sampler deals global batches; each rank trains on its share (see Trainer).
    sampler = BucketBatchSampler(dataset.bucket_sizes(), config.train_batch_size * (global_workers or world_size), config.seed,
                                 keep_partial_batches=config.disable_bucket_pruning)
    model = build_adapter_model(config, model_path, device, seed=config.seed)
    store = store or ckpt.LocalCheckpointStore(Path(config.output_dir), keep=config.checkpoints_total_limit)
    trainer = Trainer(config, model, dataset, sampler, store, device, hooks, rank=rank, world_size=world_size,
                      strategy=strategy)
    folder = resume_from or resume_point(config, store)
    if folder is not None:
        trainer.restore(folder)
    return trainer


def resume_point(config: TrainConfig, store: ckpt.CheckpointIO) -> Path | None:
    """resume_from_checkpoint: 'none' → fresh; 'latest' → newest complete checkpoint, if any; else that path."""
    choice = config.resume_from_checkpoint
    if choice == "none":
        return None
    if choice == "latest":
        return store.latest()
    folder = Path(choice)
    if not folder.is_dir():
        folder = Path(config.output_dir) / choice  # SimpleTuner also accepts a bare "checkpoint-N"
    return folder  # Trainer.restore verifies it against its manifest (one hash pass)
