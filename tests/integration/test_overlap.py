"""ddp's overlapped, bucketed gradient sync through the real Trainer: 2 gloo processes on the CPU.

With fp32 sync the guarantees of the one flat all-reduce hold: the same bits as the blocking path, the
1-vs-2-rank equality of the adapter, and a stop-and-resume that ends bitwise where a straight run does.
"""

from __future__ import annotations

import pytest
import torch
from state_equal import assert_tree_equal  # tests/ is on sys.path (conftest rootdir)
from support.checkpoints import max_abs_diff  # tests/support/
from support.ranks import train_ranks

STEPS, STOP = 6, 3
# accumulation 2: the sync runs on the second micro-step only; 4 KiB buckets: the tiny adapter's
# gradients (~90 KiB) split into many buckets, as the seed's 760 MiB split into ~30 of 25 MiB.
RECIPE = {
    "max_train_steps": STEPS,
    "checkpointing_steps": 100,
    "lr_warmup_steps": 2,
    "ema_update_interval": 2,
    "train_batch_size": 2,
    "gradient_accumulation_steps": 2,
    "optimizer": "adamw",
    "caption_dropout_probability": 0.1,
}
SYNCS = {"blocking": {"overlap": False}, "overlap": {"bucket_mb": 4 / 1024}, "bf16": {"bucket_mb": 4 / 1024, "dtype": "bf16"}}


def _run(config_path, sync: str, out, free_port, stop_at: int = 0, world: int = 2) -> dict:
    return train_ranks(config_path, out, free_port(), world, stop_at=stop_at, sync=SYNCS[sync])


@pytest.mark.slow
def test_overlapped_sync_keeps_every_guarantee_of_the_flat_one(config_file, tmp_path, free_port):
    from test_deepspeed import _fill_caches

    paths = {name: config_file(out=name, **RECIPE) for name in ("blocking", "overlap", "halves", "one", "bf16")}
    _fill_caches(paths["overlap"])

    blocking = _run(paths["blocking"], "blocking", tmp_path / "blocking.pt", free_port)
    overlap = _run(paths["overlap"], "overlap", tmp_path / "overlap.pt", free_port)
    assert overlap["buckets"] >= 8 and blocking["buckets"] == 0
    for key in ("adapter", "ema", "optimizer"):  # two ranks: a + b is exact whatever the bucket layout
        assert_tree_equal(blocking[key], overlap[key], key)

    first = _run(paths["halves"], "overlap", tmp_path / "first.pt", free_port, stop_at=STOP)
    resumed = _run(paths["halves"], "overlap", tmp_path / "resumed.pt", free_port)
    assert first["step"] == STOP and resumed["started"] == STOP and resumed["step"] == STEPS
    for key in ("adapter", "ema", "optimizer"):
        assert_tree_equal(overlap[key], resumed[key], key)
    assert torch.equal(overlap["generator"], resumed["generator"])

    one = _run(paths["one"], "overlap", tmp_path / "one.pt", free_port, world=1)  # the same global batch
    print(f"overlapped 2 ranks vs 1 rank: adapter max abs diff {max_abs_diff(overlap['adapter'], one['adapter']):.3e}")
    assert max_abs_diff(overlap["adapter"], one["adapter"]) < 1e-5

    bf16 = _run(paths["bf16"], "bf16", tmp_path / "bf16.pt", free_port)
    diff = max_abs_diff(overlap["adapter"], bf16["adapter"])
    largest = max(v.abs().max().item() for k, v in overlap["adapter"].items() if not k.endswith(".alpha"))
    print(f"bf16 sync vs fp32 after {STEPS} steps: adapter max abs diff {diff:.3e} (largest weight {largest:.3e})")
    assert 0 < diff < 1e-2 * largest  # it rounds, and stays close
