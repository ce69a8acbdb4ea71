"""A small checkpoint payload for tests of the checkpoint writer and reader."""

from __future__ import annotations

import torch

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
