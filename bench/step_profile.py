"""What one training step costs, and where the time goes: the `--profile`, `--compile` and `--kron-bench`
parts of bench/gpu_step.py, kept apart so that file stays a readable timing script.

- FLOPs: `torch.utils.flop_counter.FlopCounterMode` around one whole `Trainer.optimizer_step` (forward,
  the checkpointed blocks' recomputation, backward, optimizer). Achieved TFLOP/s = FLOPs / the timed
  median s/step; MFU = that / the device's dense bf16 peak (PEAK_BF16_TFLOPS), "n/a" with the reason
  where the device has no entry (the CPU, an unknown GPU).
- Trace: `torch.profiler` over `--profile-steps` steps. The bench (never the training step) wraps regions
  in `record_function` ranges through module hooks and instance-attribute wrappers: `relay::lokr` (the LoKr
  adapter's share of a wrapped linear, on either lokr_forward path), `relay::quanto_linear` (a quanto QLinear's
  call: dequantize + matmul; a LoKr-wrapped one's base call is a nested range inside the adapter's),
  `relay::attention` (diffusers' Attention minus its projections and q/k norms, i.e. the SDPA core, reshapes
  and concatenation), `relay::norms` (every
  *Norm* module: LayerNorm, RMSNorm, the adaLN-Zero modulation incl. its full-precision linear) and
  `relay::optimizer` (the torch optimizer's step). Each op's self time goes to its innermost range; a
  backward op goes to the range of the forward op that made its autograd node (matched by sequence
  number). Everything else (the loss, embedders, clipping, the guard, the LR schedule, EMA) is "other".
  On a GPU the times are kernel times and "launches" counts kernels; on the CPU they are aten ops' self
  times and "launches" counts top-level aten ops (each would launch one kernel or more on a GPU).
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

# Dense (not 2:4 sparse) bf16 tensor-core peaks from the vendor data sheets, TFLOP/s. Matched against
# torch.cuda.get_device_name in this order, so the more specific names come first.
PEAK_BF16_TFLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H100", "PCIe"), 756.0),
    (("H100", "NVL"), 835.0),
    (("H100",), 989.4),  # SXM5 (HBM3); "NVIDIA H100 80GB HBM3"
    (("H200",), 989.4),
    (("GH200",), 989.4),
    (("B200",), 2250.0),
    (("A100",), 312.0),
    (("L40S",), 362.05),
    (("L40",), 181.0),
    (("L4",), 121.0),
    (("A10G",), 70.0),
    (("A10",), 125.0),
)

REGIONS = ("lokr", "quanto_linear", "attention", "norms", "optimizer")
TOP_N = 25


def peak_bf16_tflops(device_name: str) -> float | None:
    for words, peak in PEAK_BF16_TFLOPS:
        if all(w.lower() in device_name.lower() for w in words):
            return peak
    return None


def mfu(flops_per_step: float, s_per_step: float, device_type: str, device_name: str) -> dict[str, Any]:
    achieved = flops_per_step / s_per_step / 1e12
    out: dict[str, Any] = {"achieved_tflops": achieved}
    peak = peak_bf16_tflops(device_name) if device_type == "cuda" else None
    if peak is None:
        out.update(
            mfu="n/a",
            peak_bf16_tflops=None,
            mfu_reason="the CPU has no bf16 tensor-core peak to compare with"
            if device_type != "cuda"
            else f"no bf16 peak on file for {device_name!r} (add it to PEAK_BF16_TFLOPS)",
        )
    else:
        out.update(mfu=achieved / peak, peak_bf16_tflops=peak)
    return out


@functools.cache
def _count_quanto_matmuls() -> bool:
    """Teach FlopCounterMode quanto's weight-int8 matmul, a custom op it would count as 0 (the forward of
    every quantized linear; the backward's input gradient dequantizes into a plain aten.mm it does count)."""
    try:
        import optimum.quanto  # noqa: F401  (defines the op)

        op = torch.ops.quanto.qbytes_mm
    except (ImportError, AttributeError):
        return False
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(op)
    def qbytes_mm_flops(a_shape: Any, b_shape: Any, *_: Any, **__: Any) -> int:
        # activations (..., in) @ int8 weights (out, in)ᵀ: 2·tokens·in·out
        tokens = 1
        for n in a_shape[:-1]:
            tokens *= n
        return 2 * tokens * a_shape[-1] * b_shape[0]

    return True


@functools.cache
def _count_cpu_attention() -> None:
    """torch's FlopCounterMode knows the CUDA SDPA kernels (flash, efficient, cuDNN) but not the CPU's flash
    kernel, which it would count as 0: give it the same formulas (same (B, H, S, D) layout, same arguments)."""
    from torch.utils.flop_counter import register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    forward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if forward is None or backward is None:
        return

    @register_flop_formula(forward)
    def cpu_sdpa(q: Any, k: Any, v: Any, *_: Any, **__: Any) -> int:
        return sdpa_flop_count(q, k, v)

    @register_flop_formula(backward)
    def cpu_sdpa_backward(grad_out: Any, q: Any, k: Any, v: Any, *_: Any, **__: Any) -> int:
        return sdpa_backward_flop_count(grad_out, q, k, v)


def count_flops(run_step: Callable[[], Any]) -> dict[str, Any]:
    """FLOPs of one call of `run_step` (one optimizer step), in total and by aten op."""
    from torch.utils.flop_counter import FlopCounterMode

    _count_quanto_matmuls()
    _count_cpu_attention()
    counter = FlopCounterMode(display=False)
    with counter:
        run_step()
    by_op = {str(op): n for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return {"flops_per_step": counter.get_total_flops(), "flops_by_op": dict(sorted(by_op.items(), key=lambda kv: -kv[1]))}


# ----------------------------------------------------------------------------- region ranges


@contextlib.contextmanager
def region_ranges(transformer: torch.nn.Module, network: torch.nn.Module, optimizer: Any) -> Iterator[None]:
    """Install the bench's `relay::*` record_function ranges for the duration of the block."""
    handles: list[Any] = []
    restore: list[tuple[Any, str, Any]] = []  # (object, attribute, its own value before, or None)

    def hooks(module: torch.nn.Module, name: str) -> None:
        open_ranges: list[Any] = []

        def pre(*_: Any) -> None:
            open_ranges.append(torch.autograd.profiler.record_function(f"relay::{name}").__enter__())

        def post(*_: Any) -> None:
            if open_ranges:
                open_ranges.pop().__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post, always_call=True))

    def wrap(obj: Any, attr: str, name: str) -> None:
        inner = getattr(obj, attr)

        @functools.wraps(inner)
        def ranged(*args: Any, **kwargs: Any) -> Any:
            with torch.autograd.profiler.record_function(f"relay::{name}"):
                return inner(*args, **kwargs)

        restore.append((obj, attr, vars(obj).get(attr)))  # the LR scheduler wraps optimizer.step on the instance
        setattr(obj, attr, ranged)

    try:
        from optimum.quanto import QModuleMixin
    except ImportError:  # no quanto: nothing to mark
        QModuleMixin = ()  # noqa: N806
    from diffusers.models.attention_processor import Attention

    for module in transformer.modules():
        if isinstance(module, QModuleMixin):
            hooks(module, "quanto_linear")
        elif isinstance(module, Attention):
            hooks(module, "attention")
        elif "Norm" in type(module).__name__:
            hooks(module, "norms")
    for module in network.modules():
        target = getattr(module, "org_module", [None])[0]
        if hasattr(module, "bypass_forward_diff") and target is not None:
            # the whole wrapped linear is the adapter's, minus its base call inside (innermost range wins):
            # LyCORIS's bypass chain, or the materialised kron + GEMM + add (relay_train/lokr.py)
            wrap(target, "forward", "lokr")
            wrap(module, "org_forward", "quanto_linear")
    wrap(optimizer, "step", "optimizer")
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for obj, attr, own in reversed(restore):
            if own is None:
                delattr(obj, attr)  # back to the class's method
            else:
                setattr(obj, attr, own)


# ----------------------------------------------------------------------------- trace summary


def _own_region(event: Any) -> str | None:
    node = event
    while node is not None:
        if node.name.startswith("relay::"):
            return node.name.removeprefix("relay::")
        node = node.cpu_parent
    return None


def _backward_seq(event: Any) -> tuple[int, int] | None:
    node = event
    while node is not None:
        if node.name.startswith("autograd::engine::evaluate_function") and getattr(node, "sequence_nr", -1) >= 0:
            return (node.fwd_thread, node.sequence_nr)
        node = node.cpu_parent
    return None


def _inside_aten(event: Any) -> bool:
    node = event.cpu_parent
    while node is not None:
        if node.name.startswith("aten::"):
            return True
        node = node.cpu_parent
    return False


def summarize_trace(events: list[Any], cuda: bool, steps: int) -> dict[str, Any]:
    """Top ops/kernels, launches per step and the share of time per region, from profiler FunctionEvents."""
    cpu_events = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    # forward ops that created autograd nodes -> their region, so a backward op can inherit it
    seq_region: dict[tuple[int, int], str] = {}
    for e in cpu_events:
        if getattr(e, "sequence_nr", -1) >= 0 and not e.name.startswith("autograd::"):
            region = _own_region(e)
            if region is not None:
                seq_region.setdefault((e.thread, e.sequence_nr), region)

    def region_of(e: Any) -> str:
        own = _own_region(e)
        if own is not None:
            return own
        seq = _backward_seq(e)
        return seq_region.get(seq, "other") if seq is not None else "other"

    by_region: dict[str, float] = defaultdict(float)
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    launches = 0
    for e in cpu_events:
        if cuda:
            items = [(k.name, k.duration) for k in e.kernels]  # microseconds, kernels this op launched
        elif e.name.startswith("aten::"):
            items = [(e.name, e.self_cpu_time_total)]  # self: its children's time is theirs
        else:
            items = []
        for name, us in items:
            by_region[region_of(e)] += us
            by_name[name][0] += us
            by_name[name][1] += 1
        # a GPU launches one kernel per kernel; on the CPU count the ops the Python/autograd layer
        # dispatches (an aten op not inside another one), each of which would be a launch or more there
        launches += len(e.kernels) if cuda else int(bool(items) and not _inside_aten(e))
    total = sum(by_region.values())
    # which SDPA kernel family ran (flash, cuDNN, memory-efficient, math; the CPU's own), from the op names
    sdpa = sorted(
        {e.name for e in cpu_events if e.name.startswith("aten::_scaled_dot_product") and not e.name.endswith("_backward")}
    )
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:TOP_N]
    return {
        "unit": "GPU kernel time" if cuda else "CPU self time of aten ops",
        "profiled_steps": steps,
        "time_per_step_ms": total / 1e3 / steps,
        "launches_per_step": launches / steps,
        "launches_what": "CUDA kernels" if cuda else "top-level aten ops (each one kernel launch or more on a GPU)",
        "sdpa_ops": sdpa,
        "region_share": {r: (by_region.get(r, 0.0) / total if total else 0.0) for r in (*REGIONS, "other")},
        "top": [
            {"name": name, "ms_per_step": us / 1e3 / steps, "calls_per_step": n / steps, "share": us / total if total else 0.0}
            for name, (us, n) in top
        ],
    }


def profile_steps(
    run_step: Callable[[], Any],
    transformer: torch.nn.Module,
    network: torch.nn.Module,
    optimizer: Any,
    device: torch.device,
    steps: int,
    trace_path: str | None = None,
    regions: bool = True,
) -> dict[str, Any]:
    """Profile `steps` steps; `regions` False leaves the model unmarked (compiled blocks): all time is "other"."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    ranges = region_ranges(transformer, network, optimizer) if regions else contextlib.nullcontext()
    with ranges, profile(activities=activities) as prof:
        for _ in range(steps):
            run_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    if trace_path:
        prof.export_chrome_trace(trace_path)
    return summarize_trace(list(prof.events()), device.type == "cuda", steps)


def architecture_flops(preset: str, batch: int, resolution: int, lycoris: Any, text_tokens: int) -> dict[str, Any]:
    """FLOPs of train_step's forward + backward at a preset's real shapes, counted on fake tensors (no memory,
    no device: sd35m at 1024² counts in seconds on a CPU): with the LoKr adapter and without it (the frozen
    base's input-gradient backward only), gradient checkpointing on and off. The base is built unquantized:
    quanto cannot quantize fake tensors, and an int8 base runs the same matmuls (the tiny preset's --profile
    counts agree). The optimizer's elementwise work is not counted (FlopCounterMode counts matmuls, convs, SDPA)."""
    from diffusers import SD3Transformer2DModel
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from relay_train.data.dataset import BucketTensors
    from relay_train.model import attach_lokr, enable_gradient_checkpointing
    from relay_train.step import train_step
    from relay_train.demo.tiny_model import transformer_config

    _count_cpu_attention()
    tcfg = transformer_config(preset)
    out: dict[str, Any] = {"preset": preset, "batch": batch, "resolution": resolution, "counted_on": "fake tensors"}
    for adapter in (True, False):
        for checkpointing in (True, False):
            with FakeTensorMode(allow_non_fake_inputs=True):
                transformer = SD3Transformer2DModel(**tcfg)
                transformer.requires_grad_(False)
                if adapter:
                    attach_lokr(transformer, lycoris).requires_grad_(True)
                else:  # one leaf up front, so backward runs through every block as it does for the adapter
                    transformer.pos_embed.proj.weight.requires_grad_(True)
                transformer.train()
                if checkpointing:
                    enable_gradient_checkpointing(transformer)
                lat, joint, pooled = resolution // 8, tcfg["joint_attention_dim"], tcfg["pooled_projection_dim"]
                batch_t = BucketTensors(
                    torch.randn(batch, 16, lat, lat), torch.randn(batch, text_tokens, joint), torch.randn(batch, pooled)
                )
                empty = (torch.zeros(text_tokens, joint), torch.zeros(pooled))
                counter = FlopCounterMode(display=False)
                with counter:
                    train_step(
                        transformer,
                        batch_t,
                        empty,
                        torch.Generator().manual_seed(0),
                        shift=3.0,
                        caption_dropout=0.0,
                        device=torch.device("cpu"),
                        dtype=torch.float32,
                    ).backward()
            key = f"{'lokr' if adapter else 'base_only'}_{'ckpt' if checkpointing else 'no_ckpt'}"
            out[key] = counter.get_total_flops()
    out["lokr_share"] = 1 - out["base_only_ckpt"] / out["lokr_ckpt"]
    return out


def add_model_flops(configs: dict[str, dict[str, Any]], device_type: str, device_name: str) -> None:
    """FlopCounterMode counts what ran, recomputation included (hardware FLOPs). The usual MFU counts the
    model's FLOPs only: for a checkpointed config, those are the count of the profiled config with the same
    batch and base but checkpointing off. Adds `model_flops_per_step` and `mfu_model` where such a pair ran."""
    for r in configs.values():
        if "profile" not in r or not r["gradient_checkpointing"]:
            continue
        twin = next(
            (
                o
                for o in configs.values()
                if "profile" in o
                and not o["gradient_checkpointing"]
                and o["batch"] == r["batch"]
                and o["quantized"] == r["quantized"]
            ),
            None,
        )
        if twin is not None:
            flops = twin["profile"]["flops_per_step"]
            r["profile"].update(model_flops_per_step=flops, mfu_model=mfu(flops, r["s_per_step"], device_type, device_name))


def format_profile(p: dict[str, Any]) -> str:
    m = p["mfu"]
    mfu_text = f"{m['mfu']:.1%} of {m['peak_bf16_tflops']:g} TFLOP/s" if m["mfu"] != "n/a" else f"n/a ({m['mfu_reason']})"
    t = p["trace"]
    lines = [
        f"FLOPs/step {p['flops_per_step']:.3e} (as run, recomputation included); achieved "
        f"{m['achieved_tflops']:.3f} TFLOP/s; MFU {mfu_text}",
        *(
            [
                f"model FLOPs/step {p['model_flops_per_step']:.3e} (no recomputation): "
                f"{p['mfu_model']['achieved_tflops']:.3f} TFLOP/s, MFU "
                + (f"{p['mfu_model']['mfu']:.1%}" if p["mfu_model"]["mfu"] != "n/a" else "n/a")
            ]
            if "model_flops_per_step" in p
            else []
        ),
        f"traced {t['unit']}: {t['time_per_step_ms']:.1f} ms/step over {t['profiled_steps']} step(s); "
        f"{t['launches_per_step']:.0f} {t['launches_what']} per step",
        "share: " + ", ".join(f"{k} {v:.1%}" for k, v in t["region_share"].items()),
        "attention ran: " + (", ".join(t["sdpa_ops"]) or "no scaled_dot_product_attention op (math path?)"),
        f"| top {len(t['top'])} by time | ms/step | calls/step | share |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {row['name'][:90]} | {row['ms_per_step']:.2f} | {row['calls_per_step']:.0f} | {row['share']:.1%} |"
        for row in t["top"]
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- regional torch.compile


def try_compiled(run_step: Callable[[], Any], sync: Callable[[], None], steps: int) -> dict[str, Any]:
    """Run compiled steps; report graph breaks and the first error, verbatim, instead of raising."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    out: dict[str, Any] = {}
    start = time.perf_counter()
    try:
        first = run_step()
        sync()
        out["first_step_s"] = time.perf_counter() - start  # includes compilation
        out["first_step"] = [float(t) for t in first[:2]]  # optimizer_step's loss and gradient norm
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            run_step()
            sync()
            times.append(time.perf_counter() - t0)
        out.update(s_per_step=statistics.median(times), step_times=times)
    except Exception as exc:  # the failure is the finding
        out.update(error=f"{type(exc).__name__}: {exc}".strip()[:4000], error_where=traceback.format_exc(limit=-4)[-3000:])
    out["graph_breaks"] = {str(k): v for k, v in counters["graph_break"].items()}
    out["unique_graphs"] = counters["stats"].get("unique_graphs", 0)
    out["recompiles"] = dict(counters["recompiles"]) if "recompiles" in counters else {}
    return out


# ----------------------------------------------------------------------------- LoKr bypass shapes


def lokr_shapes(network: torch.nn.Module) -> list[dict[str, Any]]:
    """(out, in) of each LoKr module's base and of its Kronecker factors (full_matrix: w1, w2 dense)."""
    rows = []
    for m in network.modules():
        if hasattr(m, "lokr_w1") and hasattr(m, "lokr_w2"):
            rows.append({"w1": tuple(m.lokr_w1.shape), "w2": tuple(m.lokr_w2.shape)})
    return rows


def bypass_library(h: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """What LokrModule.bypass_forward_diff runs (LyCORIS 4.1.3's kron_bypass): its per-call backend choice,
    a fused Triton/TileLang kernel on a CUDA GPU where one is installed, else torch.compile of the eager
    chain on CUDA, else (the CPU) the eager chain below."""
    from lycoris.functional.lokr import kron_bypass

    return kron_bypass(h, w1, None, None, w2, None, None, None, scale=1.0)


def bypass_library_eager(h: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """LyCORIS 4.1.3's eager linear bypass (_kron_bypass, full-matrix factors): reshape, matmul with w2,
    transpose, matmul with w1, transpose, reshape. kron(w1, w2) is never built."""
    from lycoris.functional.lokr import _kron_bypass

    return _kron_bypass(h, w1, None, None, w2, None, None, None, 1.0, {})


def bypass_materialised(h: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The rebuild path: ΔW = kron(w1, w2) built every call, then one matmul."""
    return F.linear(h, torch.kron(w1, w2))


def bypass_batched(h: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """y = vec(w1 · X · w2ᵀ) with X = h viewed (…, uq, vq): two matmuls, no transposed copies.
    kron(w1, w2)[(i·vp + k), (j·vq + l)] = w1[i, j]·w2[k, l], so y[i·vp + k] = Σ_jl w1[i, j] X[j, l] w2[k, l]."""
    up, uq = w1.shape
    x = h.reshape(*h.shape[:-1], uq, -1)
    return torch.matmul(w1, torch.matmul(x, w2.t())).reshape(*h.shape[:-1], -1)


# sd35m's LoKr modules with the seed's lycoris_config (factor 2 for Attention, 4 for FeedForward, full
# matrices): w1 (up, uq), w2 (vp, vq) as LyCORIS factorises 1536 and 6144.
SD35M_LOKR = {
    "attention 1536->1536 (factor 2)": ((2, 2), (768, 768)),
    "ff in 1536->6144 (factor 4)": ((4, 4), (1536, 384)),
    "ff out 6144->1536 (factor 4)": ((4, 4), (384, 1536)),
}


def kron_bench(tokens: int, repeats: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Forward + backward (input and factor gradients) of each bypass form at sd35m's layer shapes."""
    forms = {
        "library": bypass_library,
        "library_eager": bypass_library_eager,
        "materialised": bypass_materialised,
        "batched": bypass_batched,
    }
    g = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {"tokens": tokens, "dtype": str(dtype), "device": device.type, "layers": {}}
    for label, (s1, s2) in SD35M_LOKR.items():
        h = torch.randn(tokens, s1[1] * s2[1], generator=g).to(device, dtype)
        w1 = torch.randn(*s1, generator=g).to(device, dtype)
        w2 = (torch.randn(*s2, generator=g) / s2[1] ** 0.5).to(device, dtype)
        ref = bypass_library_eager(h, w1, w2)
        row: dict[str, Any] = {"w1": s1, "w2": s2}
        for name, fn in forms.items():
            hh, a, b = (t.detach().clone().requires_grad_(True) for t in (h, w1, w2))
            y = fn(hh, a, b)
            err = ((y.detach() - ref).abs().max() / ref.abs().max()).item()
            times = []
            for _ in range(repeats + 1):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                y = fn(hh, a, b)
                y.sum().backward()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            row[name] = {"ms_fwd_bwd": statistics.median(times[1:]) * 1e3, "max_rel_diff_vs_eager": err}
        out["layers"][label] = row
    return out


def format_kron(k: dict[str, Any]) -> str:
    forms = ("library", "library_eager", "materialised", "batched")
    lines = [
        f"| LoKr bypass fwd+bwd, {k['tokens']} tokens, {k['dtype']} on {k['device']} | library, as dispatched "
        "(ms) | library eager chain (ms) | materialised kron (ms) | batched matmul (ms) | max rel. diff vs eager "
        "(library, materialised, batched) |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in k["layers"].items():
        diffs = ", ".join(f"{r[f]['max_rel_diff_vs_eager']:.1e}" for f in ("library", "materialised", "batched"))
        lines.append(f"| {label} | " + " | ".join(f"{r[f]['ms_fwd_bwd']:.2f}" for f in forms) + f" | {diffs} |")
    return "\n".join(lines)
