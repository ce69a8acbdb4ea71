"""Checkpoints in tests: a small payload for the writer and reader, and the adapter a Ray run ended with."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from relay_train import checkpoint as ckpt


def small_payload(step: int, ema: bool = True) -> ckpt.CheckpointPayload:
    """One 2×2 adapter tensor seeded by `step` (and a zero EMA twin when `ema`), empty optimizer state."""
    gen = torch.Generator().manual_seed(step)
    return ckpt.CheckpointPayload(
        step=step,
        adapter={"lycoris_a.lokr_w1": torch.randn(2, 2, generator=gen)},
        adapter_metadata={"step": str(step)},
        ema={"lycoris_a.lokr_w1": torch.zeros(2, 2)} if ema else None,
        optimizer={"state": {}, "param_groups": []},
        scheduler={"last_epoch": step},
        rng=ckpt.capture_rng(gen),
        training_state={"step": step},
        config_json="{}",
    )


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest elementwise difference between two state dicts with the same keys."""
    return max((a[k] - b[k]).abs().max().item() for k in a)


def result_adapter(result) -> dict[str, torch.Tensor]:
    """The adapter in a Ray Train result's final checkpoint."""
    with result.checkpoint.as_directory() as folder:
        return load_file(str(Path(folder) / ckpt.ADAPTER))
