"""The GPU step's policies (relay_train/speed.py): regional compile per device, blocks to checkpoint by memory."""

from __future__ import annotations

import pytest

from relay_train.speed import (
    ACTIVATIONS_PER_TOKEN_WIDTH,
    FREE_MEMORY_HEADROOM,
    FREE_MEMORY_RESERVE,
    block_activation_bytes,
    blocks_to_checkpoint,
    compile_enabled,
)

GIB = 2**30


@pytest.mark.parametrize(
    ("choice", "device", "expected"),
    [("auto", "cuda", True), ("auto", "cpu", False), ("on", "cpu", True), ("off", "cuda", False), ("on", "cuda", True)],
)
def test_compile_is_on_for_cuda_by_default(choice, device, expected):
    assert compile_enabled(choice, device) is expected


def test_the_per_block_estimate_covers_what_the_h200_measured():
    # sd35m at batch 4, 1024², bf16: 12 blocks not checkpointed took 26.5 GiB more (2.21 GiB a block)
    per_block = block_activation_bytes(batch=4, resolution=1024, width=1536, element_size=2)
    assert per_block == 4 * (64 * 64 + 231) * 1536 * 2 * ACTIVATIONS_PER_TOKEN_WIDTH
    assert 2.21 * GIB < per_block < 2.8 * GIB


def test_a_small_card_checkpoints_every_block():
    per_block = block_activation_bytes(4, 1024, 1536, 2)  # ~2.6 GiB
    for free in (0, 2, 8, 10, 13):  # the reserve and one block's activations do not fit
        assert blocks_to_checkpoint(free_bytes=free * GIB, per_block_bytes=per_block, blocks=24) == 24, free
    assert blocks_to_checkpoint(free_bytes=20 * GIB, per_block_bytes=per_block, blocks=24) == 21  # a 24 GiB card


def test_a_large_card_checkpoints_none_or_few():
    per_block = block_activation_bytes(4, 1024, 1536, 2)
    assert blocks_to_checkpoint(free_bytes=130 * GIB, per_block_bytes=per_block, blocks=24) == 0  # an H200
    budget = 60 * GIB * (1 - FREE_MEMORY_HEADROOM) - FREE_MEMORY_RESERVE
    assert blocks_to_checkpoint(free_bytes=60 * GIB, per_block_bytes=per_block, blocks=24) == 24 - int(budget // per_block)
    assert 24 - int(budget // per_block) == 9


def test_the_count_is_monotone_in_free_memory():
    counts = [blocks_to_checkpoint(free * GIB, 2 * GIB, 24) for free in range(0, 100, 5)]
    assert counts == sorted(counts, reverse=True) and counts[0] == 24 and counts[-1] == 0


def test_headroom_reserve_and_degenerate_inputs():
    assert blocks_to_checkpoint(10 * GIB, GIB, 24, headroom=0.0, reserve=0) == 14
    assert blocks_to_checkpoint(10 * GIB, GIB, 24, headroom=0.5, reserve=0) == 19
    assert blocks_to_checkpoint(10 * GIB, GIB, 24, headroom=0.0, reserve=4 * GIB) == 18
    assert blocks_to_checkpoint(10 * GIB, 0, 24) == 0  # nothing to keep: nothing to checkpoint
    assert blocks_to_checkpoint(10 * GIB, GIB, 0) == 0
