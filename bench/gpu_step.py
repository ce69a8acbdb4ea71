"""Real-size step cost (issue 10): the SD3.5 Medium architecture with random weights, on one GPU.

Builds the `sd35m` transformer in memory and runs the production step through `Trainer.optimizer_step`
(the same code `relay train` runs: flow-matching `train_step`, bf16 autocast, backward, clip by value,
bnb AdamW8bit, LR schedule, EMA every `ema_update_interval` steps) on cached-shape inputs: latents
16×(res/8)², 231 text tokens × joint width, pooled width. The recipe comes from configs/sd3/config.json.

    python bench/gpu_step.py --out bench/gpu_step.json                      # GPU, 1024², batch 4
    python bench/gpu_step.py --device cpu --preset tiny --resolution 64 --steps 2   # the CPU test's run

The step is the one `relay train` runs now: the config's `lokr_forward`, `transformer_compile` and
`gradient_checkpointing_blocks` (each `auto` in the recipe: the materialised LoKr, the blocks compiled and
checkpointing by free memory on CUDA; LyCORIS's bypass, eager, every block on the CPU). `--lokr-forward bypass
--transformer-compile off --checkpoint-blocks all` is the step before that change (bench/gpu_h200.sh runs both).

Configurations: (a) production: int8-quanto base + LoKr, gradient checkpointing, batch 4;
(b) bf16 base without quantization; (c) gradient checkpointing off; (d) batch 1; (e) as (a) with
SimpleTuner's segmented checkpointing (--segments interval,stride: only the segments recompute).
--profile (default on with CUDA) adds FLOPs, TFLOP/s, MFU, launches per step and a torch.profiler summary per
config (bench/step_profile.py). The first step's time (compilation included) is reported beside the median.
For each: s/step (median of --steps after --warmup), peak memory (GPU: max allocated; CPU: the
process's peak RSS, a high-water mark over everything run before it), and the share of step time in
forward / backward / optimizer from a separate pass with CUDA events (so the timed steps carry no
extra syncs). The EMA update is timed on its own: it runs once every 25 steps, which a median hides.

The render timing (`--render`) is a validation render's cost: `--render-steps` sampler steps with
classifier-free guidance at the training resolution, through diffusers' StableDiffusion3Pipeline with
the production transformer (int8 + LoKr) and the real SD3 VAE architecture, eager and then with
torch.compile on the transformer. Text encoding is NOT timed: the real CLIP-L/G + T5-XXL encoders are
~5.5B parameters of weights this script does not build; prompt embeddings are passed in precomputed.

Differences from a real run, on purpose: weights are random; the base is built and quantized on the
target device (production quantizes on the CPU first; that changes start-up time, not the step).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import logging
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from relay_train import checkpoint as ckpt  # noqa: E402
from relay_train.data.buckets import Bucket  # noqa: E402
from relay_train.config import TrainConfig, load_config  # noqa: E402
from relay_train.data.dataset import BucketTensors  # noqa: E402
from relay_train.lokr import lokr_forward_paths  # noqa: E402
from relay_train.model import (  # noqa: E402
    AdapterModel,
    attach_lokr,
    choose_lokr_forward,
    compute_dtype,
    configure_checkpointing,
    enable_gradient_checkpointing,
    quantize_base,
)
from relay_train.speed import compile_blocks, compile_enabled  # noqa: E402
from relay_train.optim import clip_gradients  # noqa: E402
from relay_train.step import train_step  # noqa: E402
from relay_train.demo.tiny_model import PRESETS, transformer_config  # noqa: E402
from relay_train.logs import configure_logging  # noqa: E402
from relay_train.trainer import Trainer  # noqa: E402

import step_profile  # noqa: E402  (bench/step_profile.py: --profile, --compile, --kron-bench)

log = logging.getLogger("gpu_step")
TEXT_TOKENS = 231  # 77 CLIP + 154 T5 (see DESIGN.md)

# The VAE decodes every validation image, so the render timing needs its real architecture
# (stabilityai/stable-diffusion-3.5-medium vae/config.json); the tiny one mirrors tiny_model's.
_VAE = {
    "sd35m": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
    "tiny": dict(block_out_channels=(16, 16, 16, 16), layers_per_block=1, norm_num_groups=8),
}


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    quantized: bool = True
    checkpointing: bool = True
    batch: int | None = None  # None: the config's train_batch_size
    segmented: bool = False  # checkpoint SimpleTuner's segments (--segments interval,stride), not every block


VARIANTS = {
    v.key: v
    for v in (
        Variant("a", "production (int8 + LoKr, ckpt)"),
        Variant("b", "bf16 base, no quantization", quantized=False),
        Variant("c", "gradient checkpointing off", checkpointing=False),
        Variant("d", "batch 1", batch=1),
        Variant("e", "segmented checkpointing (--segments)", segmented=True),
    )
}


class CachedShapes:
    """Stands in for EncodedDataset and its sampler: one bucket of random cached-shape tensors on the
    CPU, in fp32, as the caches hand them to the step (train_step moves them to the device)."""

    epoch = 0

    def __init__(self, batch: int, latent_px: int, joint: int, pooled: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.tensors = BucketTensors(
            torch.randn(batch, 16, latent_px, latent_px, generator=g),
            torch.randn(batch, TEXT_TOKENS, joint, generator=g),
            torch.randn(batch, pooled, generator=g),
        )
        self.empty_prompt_embeds = torch.zeros(TEXT_TOKENS, joint)
        self.empty_pooled_embeds = torch.zeros(pooled)
        self.bucket: Bucket = (latent_px * 8, latent_px * 8)
        self.indices = list(range(batch))

    # the dataset's side
    def batch(self, bucket: Bucket, indices: list[int]) -> BucketTensors:
        return self.tensors

    # the sampler's side
    def next_batch(self) -> tuple[Bucket, list[int]]:
        return self.bucket, self.indices

    def batches_per_epoch(self) -> int:
        return 1


class Clock:
    """Phase timestamps: CUDA events on the GPU (no sync until read), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) / 1000 if self.cuda else end - start


def build_model(config: TrainConfig, preset: str, device: torch.device, quantized: bool) -> AdapterModel:
    """build_adapter_model's sequence on an in-memory random transformer: quantize, freeze, LoKr and its
    forward path (lokr_forward), regional compile (transformer_compile)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    dtype = compute_dtype(config, device)
    with torch.device(device):  # random init straight on the device: seconds, not minutes on a GPU
        transformer = SD3Transformer2DModel(**transformer_config(preset))
    if dtype != torch.float32:
        transformer.to(dtype)
    quantize_base(transformer, "int8-quanto" if quantized else "no_change")
    transformer.requires_grad_(False)
    torch.manual_seed(config.seed)
    network = attach_lokr(transformer, config.lycoris).to(device)
    network.requires_grad_(True)
    choose_lokr_forward(network, config.lokr_forward, device)  # as relay train: lokr_forward (auto: per device)
    if config.gradient_checkpointing:  # run_variant sets each config's own around the (compiled) blocks
        configure_checkpointing(transformer, config, device)
    if compile_enabled(config.transformer_compile, device.type):
        compile_blocks(transformer)
    transformer.train()
    return AdapterModel(transformer=transformer, network=network)


def make_trainer(config: TrainConfig, model: AdapterModel, data: CachedShapes, device: torch.device, scratch: Path) -> Trainer:
    return Trainer(config, model, data, data, ckpt.LocalCheckpointStore(scratch), device)  # type: ignore[arg-type]


def time_steps(trainer: Trainer, clock: Clock, warmup: int, steps: int) -> tuple[float, list[float]]:
    """The first step's wall seconds (compilation included, when compiled), and those of whole `optimizer_step`s
    after the warm-up; one sync per step to read the clock."""
    clock.sync()
    start = time.perf_counter()
    trainer.optimizer_step()
    clock.sync()
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        trainer.optimizer_step()
    clock.sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.optimizer_step()
        clock.sync()
        times.append(time.perf_counter() - start)
    return first, times


def time_phases(trainer: Trainer, clock: Clock, steps: int) -> dict[str, float]:
    """Forward (train_step, loss included) / backward / optimizer (clip, step, schedule, zero_grad),
    in the order optimizer_step runs them; mean seconds per step over `steps`."""
    totals = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    c = trainer.config
    for _ in range(steps):
        bucket, indices = trainer.sampler.next_batch()
        t0 = clock.mark()
        loss = train_step(
            trainer.model.transformer,
            trainer.dataset.batch(bucket, indices),
            trainer.empty_prompt,
            trainer.generator,
            shift=c.flow_schedule_shift,
            caption_dropout=c.caption_dropout_probability,
            device=trainer.device,
            dtype=trainer.dtype,
        )
        t1 = clock.mark()
        loss.backward()
        t2 = clock.mark()
        clip_gradients(trainer.params, c.grad_clip_method, c.max_grad_norm)
        trainer.optimizer.step()
        trainer.scheduler.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        t3 = clock.mark()
        clock.sync()
        for name, (a, b) in zip(totals, ((t0, t1), (t1, t2), (t2, t3))):
            totals[name] += clock.seconds(a, b) / steps
    return totals


def time_ema(trainer: Trainer, clock: Clock, repeats: int = 3) -> float | None:
    if trainer.ema is None:
        return None
    clock.sync()
    start = time.perf_counter()
    for _ in range(repeats):
        trainer.ema.update(trainer.model.network)
    clock.sync()
    return (time.perf_counter() - start) / repeats


def peak_memory(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {
            "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
        }
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # Linux: KiB


def run_variant(
    variant: Variant, config: TrainConfig, model: AdapterModel, args: argparse.Namespace, device: torch.device, clock: Clock
) -> dict[str, Any]:
    batch = variant.batch or config.train_batch_size
    joint, pooled = (transformer_config(args.preset)[k] for k in ("joint_attention_dim", "pooled_projection_dim"))
    data = CachedShapes(batch, args.resolution // 8, joint, pooled)
    model.transformer.disable_gradient_checkpointing()
    if variant.checkpointing and variant.segmented:
        enable_gradient_checkpointing(model.transformer, *args.segments)
    elif variant.checkpointing:  # gradient_checkpointing_blocks, as relay train: auto decides from free memory
        configure_checkpointing(model.transformer, config.model_copy(update={"train_batch_size": batch}), device)
    func = getattr(model.transformer, "_gradient_checkpointing_func", None)
    blocks = len(model.transformer.transformer_blocks)
    result: dict[str, Any] = {
        "label": variant.label,
        "batch": batch,
        "quantized": variant.quantized,
        "gradient_checkpointing": variant.checkpointing,
        "checkpointed_blocks": getattr(func, "count", blocks) if model.transformer.gradient_checkpointing else 0,
        "lokr_forward": dict(lokr_forward_paths(model.network)),
        "compiled": compile_enabled(config.transformer_compile, device.type),
    }
    if variant.segmented:
        result["segments"] = {
            "gradient_checkpointing_interval": args.segments[0],
            "gradient_checkpointing_segment_stride": args.segments[1],
        }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory() as scratch:
        trainer = make_trainer(config.model_copy(update={"train_batch_size": batch}), model, data, device, Path(scratch))
        try:
            first, times = time_steps(trainer, clock, args.warmup, args.steps)
            result.update(first_step_s=first, s_per_step=statistics.median(times), s_per_step_max=max(times), step_times=times)
            result.update(peak_memory(device))
            phases = time_phases(trainer, clock, args.phase_steps)
            total = sum(phases.values())
            result.update(phase_s=phases, phase_share={k: v / total for k, v in phases.items()})
            result["ema_update_s"] = time_ema(trainer, clock)
            if args.profile:
                result["profile"] = profile_variant(trainer, model, result["s_per_step"], args, device)
        except torch.OutOfMemoryError as exc:
            result.update(error=f"out of memory: {str(exc).splitlines()[0]}", **peak_memory(device))
        finally:
            trainer.optimizer.zero_grad(set_to_none=True)
            del trainer
            release(device)
    return result


def profile_variant(
    trainer: Trainer, model: AdapterModel, s_per_step: float, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    """FLOPs of one optimizer step, TFLOP/s and MFU against the timed median, and the trace summary."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    # FlopCounterMode counts aten ops; compiled blocks run inductor kernels, so count one step run eagerly:
    # the same matmuls, recomputation included (the checkpointing is the run's own).
    with torch.compiler.set_stance("force_eager"):
        out = step_profile.count_flops(trainer.optimizer_step)
    out["mfu"] = step_profile.mfu(out["flops_per_step"], s_per_step, device.type, name)
    trace = str(args.trace) if args.trace else None
    compiled = any(getattr(b, "_compiled_call_impl", None) is not None for b in model.transformer.transformer_blocks)
    out["trace"] = step_profile.profile_steps(
        trainer.optimizer_step,
        model.transformer,
        model.network,
        trainer.optimizer,
        device,
        args.profile_steps,
        trace,
        regions=not compiled,  # ranges inside compiled blocks would change what dynamo compiled
    )
    return out


def run_compiled(config: TrainConfig, args: argparse.Namespace, device: torch.device, clock: Clock) -> dict[str, Any]:
    """Config (a) with each transformer block torch.compile'd in place (regional compilation), and the
    first step's loss and gradient norm against an eager build of the same seeds (same maths?)."""
    joint, pooled = (transformer_config(args.preset)[k] for k in ("joint_attention_dim", "pooled_projection_dim"))
    out: dict[str, Any] = {"what": "production step, every transformer block compiled (nn.Module.compile)"}
    for mode in ("eager", "compiled"):
        setting = {"transformer_compile": "off" if mode == "eager" else "on"}
        model = build_model(config.model_copy(update=setting), args.preset, device, quantized=True)
        data = CachedShapes(config.train_batch_size, args.resolution // 8, joint, pooled)
        with tempfile.TemporaryDirectory() as scratch:
            trainer = make_trainer(config, model, data, device, Path(scratch))
            if mode == "eager":
                out["eager_first_step"] = [float(t) for t in trainer.optimizer_step()[:2]]  # loss, grad norm
            else:
                out["blocks"] = len(model.transformer.transformer_blocks)
                out.update(step_profile.try_compiled(trainer.optimizer_step, clock.sync, args.steps))
            del trainer
        del model
        release(device)
    if "first_step" in out:
        out["first_step_rel_diff"] = [abs(c - e) / max(abs(e), 1e-30) for c, e in zip(out["first_step"], out["eager_first_step"])]
    return out


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- validation render


def build_vae(preset: str, dtype: torch.dtype, device: torch.device):
    from diffusers import AutoencoderKL

    blocks = len(_VAE[preset]["block_out_channels"])
    with torch.device(device):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * blocks,
            up_block_types=("UpDecoderBlock2D",) * blocks,
            latent_channels=16,
            scaling_factor=1.5305,
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
            **_VAE[preset],
        )
    return (vae if dtype == torch.float32 else vae.to(dtype)).eval()


def time_renders(
    model: AdapterModel, config: TrainConfig, args: argparse.Namespace, device: torch.device, clock: Clock
) -> dict[str, Any]:
    """Seconds per validation image, eager then compiled (as --validation_torch_compile would)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    dtype = compute_dtype(config, device)
    model.transformer.disable_gradient_checkpointing()
    model.transformer.eval()
    pipe = StableDiffusion3Pipeline(
        transformer=model.transformer,
        vae=build_vae(args.preset, dtype, device),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    tcfg = transformer_config(args.preset)
    g = torch.Generator().manual_seed(0)
    embeds = [torch.randn(1, TEXT_TOKENS, tcfg["joint_attention_dim"], generator=g).to(device, dtype) for _ in range(2)]
    pooled = [torch.randn(1, tcfg["pooled_projection_dim"], generator=g).to(device, dtype) for _ in range(2)]
    autocast = torch.autocast("cuda", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    def render(steps: int) -> float:
        clock.sync()
        start = time.perf_counter()
        with autocast:
            pipe(
                prompt_embeds=embeds[0],
                pooled_prompt_embeds=pooled[0],
                negative_prompt_embeds=embeds[1],
                negative_pooled_prompt_embeds=pooled[1],
                height=args.resolution,
                width=args.resolution,
                num_inference_steps=steps,
                guidance_scale=args.guidance,
                generator=torch.Generator().manual_seed(0),
            )
        clock.sync()
        return time.perf_counter() - start

    out: dict[str, Any] = {
        "steps": args.render_steps,
        "guidance": args.guidance,
        "resolution": args.resolution,
        "text_encoding": "not timed (embeddings passed in)",
    }
    modes = {"eager": ["eager"], "compiled": ["compiled"], "both": ["eager", "compiled"]}[args.render]
    for mode in modes:
        try:
            entry: dict[str, Any] = {}
            if mode == "compiled":
                pipe.transformer.compile()  # nn.Module.compile: in place, so the pipeline keeps its module
            first = render(args.render_steps)  # eager: warm-up; compiled: includes compilation
            times = [render(args.render_steps) for _ in range(args.render_repeats)]
            entry.update(first_render_s=first, s_per_image=statistics.median(times), times=times)
            if device.type == "cuda":
                entry["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        except Exception as exc:  # a compile failure is a finding to report, not a crash of the bench
            entry = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
            log.exception("render (%s) failed", mode)
        out[mode] = entry
    return out


# ----------------------------------------------------------------------------- report


def table(results: dict[str, Any]) -> str:
    mem_key = "peak_allocated_gib" if results["device_type"] == "cuda" else "peak_rss_gib"
    mem_head = "peak GPU mem (GiB, allocated)" if results["device_type"] == "cuda" else "peak RSS (GiB, process)"
    lines = [
        f"| config | batch | LoKr path, compiled, checkpointed blocks | s/step (median of {results['steps']}) | "
        f"first step (s) | MFU (as run) | launches/step | {mem_head} | forward | backward | optimizer | "
        "EMA update (s, every 25 steps) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in sorted(results["configs"].items()):
        path = "+".join(r.get("lokr_forward", {})) or "?"
        how = f"{path}, {'yes' if r.get('compiled') else 'no'}, {r.get('checkpointed_blocks')}"
        if "error" in r:
            lines.append(
                f"| ({key}) {r['label']} | {r['batch']} | {how} | {r['error']} | | | | "
                f"{r.get(mem_key, float('nan')):.2f} | | | | |"
            )
            continue
        share = r["phase_share"]
        ema = "-" if r["ema_update_s"] is None else f"{r['ema_update_s']:.4f}"
        profile = r.get("profile") or {}
        mfu = profile.get("mfu", {}).get("mfu", "-")
        launches = profile.get("trace", {}).get("launches_per_step")
        lines.append(
            f"| ({key}) {r['label']} | {r['batch']} | {how} | {r['s_per_step']:.3f} | {r['first_step_s']:.1f} | "
            f"{mfu if isinstance(mfu, str) else f'{mfu:.3f}'} | {'-' if launches is None else f'{launches:.0f}'} | "
            f"{r[mem_key]:.2f} | {share['forward']:.0%} | {share['backward']:.0%} | {share['optimizer']:.0%} | {ema} |"
        )
    adapter = results.get("adapter")
    if adapter:
        lines += [
            "",
            f"Adapter: {adapter['parameters'] / 1e6:.1f}M trainable parameters ({adapter['dtype']}); "
            f"the data-parallel all-reduce moves {adapter['gradient_bytes'] / 2**30:.2f} GiB of gradients a step.",
        ]
    render = results.get("render")
    if render:
        lines += [
            "",
            f"| validation render ({render['steps']} steps, guidance {render['guidance']:g}, "
            f"{render['resolution']}², text encoding not timed) | s/image | first render (s) |",
            "|---|---|---|",
        ]
        for mode in ("eager", "compiled"):
            r = render.get(mode)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {mode} | {r['error']} | |")
            else:
                lines.append(f"| {mode} | {r['s_per_image']:.3f} | {r['first_render_s']:.3f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (one GPU) or cpu")
    p.add_argument("--preset", choices=PRESETS, default="sd35m")
    p.add_argument("--resolution", type=int, default=1024, help="square image edge in px (latents are /8)")
    p.add_argument("--batch", type=int, default=4, help="batch of configs a-c (the recipe's train_batch_size)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per config (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--phase-steps", type=int, default=5, help="steps of the separate phase-timing pass")
    p.add_argument("--configs", default="a,b,c,d", help="comma-separated subset of a,b,c,d,e")
    p.add_argument("--segments", default="2,4", help="config e: gradient_checkpointing_interval,segment_stride")
    p.add_argument("--render", choices=["both", "eager", "compiled", "off"], default="both")
    p.add_argument("--render-steps", type=int, default=30)
    p.add_argument("--render-repeats", type=int, default=2)
    p.add_argument("--guidance", type=float, default=6.0)
    p.add_argument("--config", type=Path, default=REPO / "configs/sd3/config.json", help="the recipe")
    # The step as relay train runs it by default (each key's auto); `--lokr-forward bypass --transformer-compile
    # off --checkpoint-blocks all` is the step before the LoKr fast path (bench/RESULTS.md's "before").
    p.add_argument("--lokr-forward", choices=["auto", "materialized", "bypass"], help="lokr_forward (default: the config's)")
    p.add_argument("--transformer-compile", choices=["auto", "on", "off"], help="transformer_compile (default: the config's)")
    p.add_argument("--checkpoint-blocks", help="gradient_checkpointing_blocks: auto, all, or a count (default: the config's)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="per config: FLOPs (FlopCounterMode), TFLOP/s, MFU, launches per step and a torch.profiler summary "
        "(default: on with CUDA, off on the CPU)",
    )
    p.add_argument("--profile-steps", type=int, default=2, help="steps under torch.profiler (--profile)")
    p.add_argument("--trace", type=Path, help="with --profile: also write the Chrome trace of the last config here")
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time config (a) with each transformer block compiled; reports graph breaks/errors",
    )
    p.add_argument(
        "--kron-bench",
        action="store_true",
        help="also time the LoKr bypass forms at sd35m's layer shapes (see step_profile.kron_bench)",
    )
    p.add_argument(
        "--count-flops",
        action="store_true",
        help="also count the step's FLOPs at --preset/--resolution/--batch on fake tensors (CPU, seconds)",
    )
    p.add_argument(
        "--kron-tokens", type=int, default=0, help="tokens per kron-bench call; 0: batch x (latent tokens + 231 text tokens)"
    )
    args = p.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if args.profile is None:
        args.profile = args.device.startswith("cuda")
    if args.checkpoint_blocks not in (None, "auto", "all") and not args.checkpoint_blocks.isdigit():
        p.error("--checkpoint-blocks: auto, all, or a count of blocks")
    unknown = [c for c in args.configs if c not in VARIANTS]
    if unknown or args.resolution % 16:
        p.error(
            f"--configs: unknown {unknown}; choose from a,b,c,d,e"
            if unknown
            else "--resolution must be a multiple of 16 (8x VAE, 2x2 patches)"
        )
    interval, _, stride = args.segments.partition(",")
    args.segments = (int(interval), int(stride) if stride else None)
    if args.segments[0] < 2 or (args.segments[1] is not None and args.segments[1] < args.segments[0]):
        p.error("--segments: interval 2 or more, and a stride at least the interval")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    configure_logging()
    logging.getLogger("relay_train").setLevel(logging.WARNING)  # the bench's own lines, not the trainer's
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible (use --device cpu --preset tiny for the CPU check)")
    clock = Clock(device)
    overrides: dict[str, Any] = {"train_batch_size": args.batch, "resume_from_checkpoint": "none"}
    if args.lokr_forward:
        overrides["lokr_forward"] = args.lokr_forward
    if args.transformer_compile:
        overrides["transformer_compile"] = args.transformer_compile
    if args.checkpoint_blocks:
        blocks = args.checkpoint_blocks
        overrides["gradient_checkpointing_blocks"] = (
            transformer_config(args.preset)["num_layers"] if blocks == "all" else blocks if blocks == "auto" else int(blocks)
        )
    config = load_config(args.config, overrides)
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python bench/gpu_step.py", *(sys.argv[1:] if argv is None else argv)]),
        "device_type": device.type,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "preset": args.preset,
        "resolution": args.resolution,
        "steps": args.steps,
        "warmup": args.warmup,
        "lokr_forward": config.lokr_forward,
        "transformer_compile": config.transformer_compile,
        "gradient_checkpointing_blocks": config.gradient_checkpointing_blocks,
        "configs": {},
    }
    # Two builds: the int8 base serves a, c, d and the render; the bf16 base serves b.
    groups: list[tuple[bool, list[str]]] = [
        (True, [c for c in args.configs if VARIANTS[c].quantized]),
        (False, [c for c in args.configs if not VARIANTS[c].quantized]),
    ]
    for quantized, keys in groups:
        wants_render = quantized and args.render != "off"
        if not keys and not wants_render:
            continue
        start = time.perf_counter()
        model = build_model(config, args.preset, device, quantized)
        log.info("built %s (%s base) in %.1f s", args.preset, "int8" if quantized else "bf16/fp32", time.perf_counter() - start)
        params = model.trainable_parameters()
        # What the data-parallel all-reduce moves per step (relay_train.parallel: one flat tensor).
        results.setdefault(
            "adapter",
            {
                "parameters": sum(p.numel() for p in params),
                "dtype": str(params[0].dtype),
                "gradient_bytes": sum(p.numel() * p.element_size() for p in params),
            },
        )
        for key in keys:
            results["configs"][key] = run_variant(VARIANTS[key], config, model, args, device, clock)
            log.info("(%s) %s", key, {k: v for k, v in results["configs"][key].items() if k not in ("step_times", "profile")})
            save(results, args.out)  # after each config: a run cut short still leaves its figures
        if wants_render:
            results["render"] = time_renders(model, config, args, device, clock)
            save(results, args.out)
        del model
        release(device)
    step_profile.add_model_flops(results["configs"], device.type, results["device"])
    if args.compile:
        results["compile"] = run_compiled(config, args, device, clock)
        save(results, args.out)
    if args.count_flops:
        results["architecture_flops"] = step_profile.architecture_flops(
            args.preset, args.batch, args.resolution, config.lycoris, TEXT_TOKENS
        )
        save(results, args.out)
    if args.kron_bench:
        tokens = args.kron_tokens or args.batch * ((args.resolution // 16) ** 2 + TEXT_TOKENS)
        results["kron_bench"] = step_profile.kron_bench(tokens, 3, device, compute_dtype(config, device))
        save(results, args.out)
    print(report(results))
    return results


def report(results: dict[str, Any]) -> str:
    parts = [table(results)] if results["configs"] else []
    for key, r in sorted(results["configs"].items()):
        if "profile" in r:
            parts.append(f"\n({key}) {r['label']}, profile:\n" + step_profile.format_profile(r["profile"]))
    if "compile" in results:
        c = results["compile"]
        status = c.get("error") or (
            f"{c['s_per_step']:.3f} s/step (first step {c['first_step_s']:.1f} s); first "
            "step's loss, grad norm vs eager: rel. diff " + ", ".join(f"{d:.1e}" for d in c["first_step_rel_diff"])
        )
        parts.append(
            f"\nregional compile ({c['blocks']} blocks): {status.splitlines()[0]}; "
            f"graph breaks {sum(c['graph_breaks'].values())}: {c['graph_breaks']}"
        )
    if "architecture_flops" in results:
        f = results["architecture_flops"]
        parts.append(
            f"\nFLOPs per step, {f['preset']} batch {f['batch']} at {f['resolution']}² (fake tensors): "
            f"with LoKr {f['lokr_ckpt']:.3e} checkpointed / {f['lokr_no_ckpt']:.3e} not; base only "
            f"{f['base_only_ckpt']:.3e} / {f['base_only_no_ckpt']:.3e}; LoKr's share {f['lokr_share']:.1%}"
        )
    if "kron_bench" in results:
        parts.append("\n" + step_profile.format_kron(results["kron_bench"]))
    return "\n".join(parts)


def save(results: dict[str, Any], out: Path | None) -> None:
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
