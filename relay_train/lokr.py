"""How each LoKr module runs its forward: LyCORIS's bypass, or ΔW materialised as one matrix.

LyCORIS's bypass computes y = W·x + s·vec(w1 · unvec(x) · w2ᵀ) as a chain of small, oddly shaped GEMMs (on
an H200 they ran as Ampere 32×32 WMMA tiles: 62% of the recipe's step). The materialised form builds
ΔW = s·kron(w1, w2) once per call (an outer product, one elementwise kernel) and applies it as one large
GEMM: y = W·x + ΔW·x. The gradients of w1 and w2 come from ΔW's gradient through autograd of torch.kron
(reshapes and a reduction); nothing is hand-written. The adapter's parameters, names and saved keys are
LyCORIS's own: only the function the wrapped linear calls changes.

Both paths cast the adapter's input to the autocast dtype first: under bf16 autocast the norms hand the
linears fp32 while other linears get bf16, and LyCORIS's own compiled bypass recompiled on every flip
until dynamo's limit. The cast is what autocast does to the matmul anyway, so the numbers are the same.
"""

from __future__ import annotations

import collections
import types
import typing

import torch
import torch.nn.functional as F

from relay_train.config import TrainConfig

LOKR_FORWARDS: tuple[str, ...] = typing.get_args(TrainConfig.model_fields["lokr_forward"].annotation)

# What `auto` runs per device type. CUDA: the H200 measured the materialised kron 2.4x (attention) and 2.9x
# (ff in) faster than the bypass (../shared/gpu/h200-2026-12-04). CPU: bench/bench_lokr.py, bench/RESULTS.md.
AUTO_PATH: dict[str, str] = {"cuda": "materialized", "cpu": "bypass"}


def resolve_lokr_forward(choice: str, device_type: str) -> str:
    """The path a `lokr_forward` setting runs on a device type: `materialized` or `bypass`."""
    if choice not in LOKR_FORWARDS:
        raise ValueError(f"lokr_forward: {choice!r} is not one of {', '.join(LOKR_FORWARDS)}")
    if choice != "auto":
        return choice
    return AUTO_PATH.get(device_type, "bypass")


def unsupported_reason(module: torch.nn.Module) -> str | None:
    """Why a LoKr module must keep LyCORIS's own forward (None: both Relay paths apply to it)."""
    checks = (
        (getattr(module, "module_type", None) != "linear", "not a linear layer"),
        (getattr(module, "wd", False), "weight decomposition (DoRA)"),
        (bool(getattr(module, "rank_dropout", 0)), "rank_dropout"),
        (bool(getattr(module, "module_dropout", 0)), "module_dropout"),
        (bool(getattr(module, "dropout", 0)), "dropout"),
        (isinstance(getattr(module, "scalar", None), torch.nn.Parameter), "use_scalar"),
        (not getattr(module, "bypass_mode", False), "bypass_mode false (LyCORIS merges into the weight)"),
    )
    return next((why for bad, why in checks if bad), None)


def compute_dtype_of(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on `x` runs in: autocast's when it is on for x's device, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def delta_weight(module: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """ΔW = scale·multiplier·kron(w1, w2), (out, in), in `dtype`; a factored half is w_a @ w_b first."""
    w1 = module.lokr_w1 if module.use_w1 else module.lokr_w1_a @ module.lokr_w1_b
    w2 = module.lokr_w2 if module.use_w2 else module.lokr_w2_a @ module.lokr_w2_b
    delta = torch.kron(w1.to(dtype), w2.to(dtype))
    scale = module.scale * module.multiplier  # python floats: no kernel when it is 1 (full_matrix)
    return delta if scale == 1 else delta * scale


def _materialized_forward(self: torch.nn.Module, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    """y = W·x + ΔW·x: the base (quanto) linear, then one GEMM with the materialised ΔW."""
    dtype = compute_dtype_of(x)
    return self.org_forward(x, *args, **kwargs) + F.linear(x.to(dtype), delta_weight(self, dtype))


def _bypass_forward(self: torch.nn.Module, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    """LyCORIS's bypass (LokrModule.bypass_forward), its input in the compute dtype (see the module docstring)."""
    return self.org_forward(x, *args, **kwargs) + self.bypass_forward_diff(x.to(compute_dtype_of(x)), scale=self.multiplier)


_FORWARDS = {"materialized": _materialized_forward, "bypass": _bypass_forward}


def lokr_modules(network: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in network.modules() if hasattr(m, "lokr_w1") or hasattr(m, "lokr_w1_a")]


def set_lokr_forward(network: torch.nn.Module, path: str) -> collections.Counter[str]:
    """Point every applied LoKr module's wrapped linear at `path`'s forward; returns how many modules run
    which path ('materialized', 'bypass', or 'lycoris (<reason>)' for those kept on LyCORIS's own forward)."""
    if path not in _FORWARDS:
        raise ValueError(f"lokr path {path!r}: expected one of {sorted(_FORWARDS)}")
    for module in lokr_modules(network):
        target = module.org_module[0]
        if unsupported_reason(module) is None:
            # An instance attribute, as LyCORIS's apply_to sets it: nn.Module.__call__ finds it first.
            target.forward = types.MethodType(_FORWARDS[path], module)
        else:
            target.forward = module.forward
    return lokr_forward_paths(network)


def lokr_forward_paths(network: torch.nn.Module) -> collections.Counter[str]:
    """What each LoKr module's wrapped linear runs now, read from the modules themselves (not the config)."""
    names = {fn: name for name, fn in _FORWARDS.items()}
    paths: collections.Counter[str] = collections.Counter()
    for module in lokr_modules(network):
        forward = module.org_module[0].forward
        own = getattr(forward, "__func__", None)
        if own in names and getattr(forward, "__self__", None) is module:
            paths[names[own]] += 1
        else:
            paths[f"lycoris ({unsupported_reason(module) or 'its own forward'})"] += 1
    return paths


def describe_paths(paths: collections.Counter[str], choice: str, device_type: str) -> str:
    """The start-up line: which forward the LoKr modules run, and why."""
    parts = ", ".join(f"{n} {name}" for name, n in sorted(paths.items()))
    return f"LoKr forward: {parts} (lokr_forward {choice} on {device_type})"
