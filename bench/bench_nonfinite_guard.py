"""What the non-finite step guard (relay_train/nonfinite.py) costs per optimizer step.

    python bench/bench_nonfinite_guard.py [--elements 10e6] [--tensors 760] [--optimizer bnb-adamw8bit] [--device cpu]

Builds an adapter-shaped set of tensors (the seed's LoKr has ~760 tensors; pass --elements 90e6 for its
size), then times the optimizer step alone and wrapped in the guard (before + step + after), on the
device given. Prints the milliseconds of each, the guard's share, and its transient memory.
"""

from __future__ import annotations

import argparse
import time

import torch

from relay_train.nonfinite import StepGuard, step_tensors


def timed(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up: creates the optimizer state
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--elements", type=float, default=10e6)
    parser.add_argument("--tensors", type=int, default=760)
    parser.add_argument("--optimizer", choices=["adamw", "bnb-adamw8bit"], default="bnb-adamw8bit")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    per = int(args.elements // args.tensors)
    params = [torch.nn.Parameter(torch.randn(per, device=device) * 0.01) for _ in range(args.tensors)]
    if args.optimizer == "bnb-adamw8bit":
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params, lr=1e-4)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    guard = StepGuard(optimizer, params, undo=True, use_loss=True)
    loss, norm = torch.ones((), device=device), torch.ones((), device=device)

    def plain() -> None:
        optimizer.step()

    def guarded() -> None:
        snapshot = guard.before()
        optimizer.step()
        guard.after(snapshot, loss, norm)

    step_ms = timed(plain, device, args.repeats)
    guarded_ms = timed(guarded, device, args.repeats)
    copied = sum(t.numel() * t.element_size() for t in step_tensors(optimizer, params))
    print(f"{args.optimizer} on {device}: {len(params)} tensors, {args.elements / 1e6:.0f}M elements")
    print(
        f"optimizer step {step_ms:.1f} ms; with the guard {guarded_ms:.1f} ms (+{guarded_ms - step_ms:.1f} ms, "
        f"{(guarded_ms - step_ms) / step_ms:.0%} of the step alone); snapshot {copied / 2**20:.0f} MiB, "
        f"transient peak ~{2 * copied / 2**20:.0f} MiB"
    )


if __name__ == "__main__":
    main()
