"""Non-finite steps: found on the device, their update undone there, counted; the loop reads the count
at a host sync it already pays for (the log window, or a checkpoint).

Why not simply check `loss.isfinite()` before the optimizer step: that is a host sync per step,
which stalls the GPU queue. Instead each step is guarded without leaving the device:

    before the step   copy every tensor the step may write (the adapter's weights, the tensors the
                      optimizer steps, its state) into one flat buffer per dtype;
    after the step    ok = isfinite(loss) & isfinite(grad norm) & isfinite(‖adapter‖), and
                      tensor ← where(ok, tensor, copy), on the device.

Cost, per optimizer step with policy `skip`: two concatenations, a `where` and a multi-tensor copy over
the adapter and its optimizer state S (S ≈ 0.54 GB for the seed's ~90M-element LoKr with AdamW8bit:
fp32 weights plus two uint8 moments), i.e. about 9·S ≈ 5 GB of memory traffic (~1 ms on an H200-class
GPU, against a training step of several hundred ms) and 2·S of transient memory, plus a norm over the
adapter; a handful of kernel launches, whatever the tensor count. It is about four times the memory
traffic of the optimizer step itself: bench/bench_nonfinite_guard.py measured torch AdamW over 10M
elements on this project's 2-core CPU at 73 ms a step alone and 360 ms guarded, which matters only
where the optimizer step is a large share of the training step (never for SD3.5's transformer).
Policy `stop` takes no copy: the loop stops at the next host sync after a non-finite step, and
nothing non-finite is ever written.

What a skipped step still changes: the LR schedule advances (it counts steps, as with GradScaler),
and the optimizer's step counter, a host-side number in both torch AdamW and bnb, counts the attempt,
so its bias correction 1 − βᵗ runs one step ahead: a difference that fades within a few thousand steps.
Correcting it would need the host to know, i.e. a sync. On the first step of a run the optimizer
creates its state inside the step, where nothing can be copied before; that one step pays one host
sync so that a non-finite first step leaves no state behind.

With several ranks the gate uses values every rank shares, so every rank skips the same steps: the
gradient norm after the all-reduce and the adapter after the step. A rank's own loss is not used (it
differs per rank); a non-finite local loss makes that rank's gradients, hence the summed ones, non-finite.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Training stopped on non-finite values; nothing non-finite was written."""


def nonfinite_stop(policy: str, max_in_a_row: int, step: int, unread: float, in_a_row: float) -> str | None:
    """The non-finite policy, pure: after the host read `unread` non-finite steps since the last check and
    `in_a_row` now, the reason to stop (a template with {where}: what the newest checkpoint is), or None
    to go on (their updates were undone; the caller logs them). `stop` stops at the first; `skip` after
    `max_in_a_row` in a row."""
    if not unread:
        return None
    if policy == "stop":
        return (
            f"step {step}: the loss or gradient norm became NaN/inf ({int(unread)} step(s) since the last "
            "check) and nonfinite_policy is stop. Nothing non-finite was written; {where}. Lower "
            "learning_rate and resume, or set nonfinite_policy skip"
        )
    if in_a_row >= max_in_a_row:
        return (
            f"step {step}: {int(in_a_row)} non-finite steps in a row (max_nonfinite_steps "
            f"{max_in_a_row}): training has diverged. Their updates were undone and nothing "
            "non-finite was written; {where}. Check learning_rate, flow_schedule_shift and the data, "
            "then resume"
        )
    return None


@dataclass
class _Snapshot:
    groups: list[tuple[list[torch.Tensor], torch.Tensor]]  # (tensors, their flat copy) per (device, dtype)
    state_entries: int


def step_tensors(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every tensor an optimizer step may write: the model's parameters, the tensors the optimizer
    steps (ZeRO steps flat fp32 partitions, not the parameters), and its state, less the host-side
    step counters. Deduplicated by identity."""
    seen: set[int] = set()
    found = []
    candidates = [*params, *(p for g in optimizer.param_groups for p in g["params"])]
    for entry in optimizer.state.values():
        candidates += [v for k, v in entry.items() if k != "step" and torch.is_tensor(v)]
    for tensor in candidates:
        if id(tensor) not in seen and tensor.numel():
            seen.add(id(tensor))
            found.append(tensor)
    return found


class StepGuard:
    """Wraps one optimizer step: `before()`, the step, then `after(...)` returns `ok` (a 0-dim bool
    tensor on the device) and, when undo is on, has put back every tensor of a non-finite step."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], undo: bool, use_loss: bool):
        self.optimizer, self.params, self.undo, self.use_loss = optimizer, params, undo, use_loss

    @torch.no_grad()
    def before(self) -> _Snapshot | None:
        if not self.undo:
            return None
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for tensor in step_tensors(self.optimizer, self.params):
            groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
        flat = [(ts, torch.cat([t.detach().reshape(-1) for t in ts])) for ts in groups.values()]
        return _Snapshot(flat, sum(len(e) for e in self.optimizer.state.values()))

    @torch.no_grad()
    def after(self, snapshot: _Snapshot | None, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        device = self.params[0].device
        checks = [
            grad_norm.to(device, torch.float32).reshape(()),
            torch.stack(torch._foreach_norm([p.detach().float() for p in self.params])).sum(),
        ]
        if self.use_loss:
            checks.append(loss.to(device, torch.float32).reshape(()))
        ok = torch.isfinite(torch.stack(checks)).all()
        if snapshot is None:
            return ok
        for tensors, saved in snapshot.groups:
            keep = torch.where(ok.to(saved.device), torch.cat([t.detach().reshape(-1) for t in tensors]), saved)
            torch._foreach_copy_(
                [t.detach() for t in tensors], [v.view_as(t) for v, t in zip(keep.split([t.numel() for t in tensors]), tensors)]
            )
        if sum(len(e) for e in self.optimizer.state.values()) != snapshot.state_entries and not bool(ok):
            # The optimizer created state inside this (non-finite) step: nothing held a copy of it, so
            # drop it (a host sync, paid only on a step that created state: the run's first).
            self.optimizer.state.clear()
            log.warning("the first optimizer step was non-finite: its optimizer state was dropped")
        return ok


def nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors holding NaN or inf (host side: call on CPU copies)."""
    return [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
