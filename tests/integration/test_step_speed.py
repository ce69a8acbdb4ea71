"""Segmented gradient checkpointing (gradient_checkpointing_interval / _segment_stride, SimpleTuner 4.10.1's SD3
meaning) on a tiny int8 + LoKr transformer: the loss and the adapter's gradients on a fixed batch are those of
per-block checkpointing and of no checkpointing, while only the blocks the plan names are recomputed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from relay_train.config import ConfigError, load_config
from relay_train.data.dataset import BucketTensors
from relay_train.model import (
    SegmentCheckpointing,
    attach_lokr,
    configure_checkpointing,
    enable_gradient_checkpointing,
    quantize_base,
)
from relay_train.speed import FirstBlocksCheckpointing
from relay_train.step import train_step
from relay_train.demo.tiny_model import transformer_config

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "configs/sd3/config.json"
LAYERS = 5


@pytest.fixture(scope="module")
def model():
    from diffusers import SD3Transformer2DModel

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model gains nothing from 2 threads, and a busy 2-core box loses a lot

    config = load_config(RECIPE, {"resume_from_checkpoint": "none"})
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(**{**transformer_config("tiny"), "num_layers": LAYERS})
    quantize_base(transformer, "int8-quanto")
    transformer.requires_grad_(False)
    network = attach_lokr(transformer, config.lycoris)
    network.requires_grad_(True)
    with torch.no_grad():  # LoKr starts at zero (w2 = 0): make the adapter's path matter
        for p in network.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    transformer.train()
    yield transformer, network
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(model):
    return loss_and_grads(*model, None)


def loss_and_grads(transformer, network, setting):
    """One step's loss and adapter gradients, and how often each block ran (forward + recomputation)."""
    transformer.disable_gradient_checkpointing()
    if callable(setting):
        setting(transformer)
    elif setting is not None:
        enable_gradient_checkpointing(transformer, *setting)
    calls = [0] * LAYERS
    hooks = [
        block.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, block in enumerate(transformer.transformer_blocks)
    ]
    g = torch.Generator().manual_seed(7)
    batch = BucketTensors(
        torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 231, 64, generator=g), torch.randn(2, 64, generator=g)
    )
    empty = (torch.zeros(231, 64), torch.zeros(64))
    try:
        network.zero_grad(set_to_none=True)
        loss = train_step(
            transformer,
            batch,
            empty,
            torch.Generator().manual_seed(3),
            shift=3.0,
            caption_dropout=0.0,
            device=torch.device("cpu"),
            dtype=torch.float32,
        )
        loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
    return loss.detach(), [p.grad.clone() for p in network.parameters()], calls


@pytest.mark.parametrize(
    ("setting", "recomputed"),
    [
        ((None, None), [1, 1, 1, 1, 1]),  # today's per-block checkpointing
        ((1, None), [1, 1, 1, 1, 1]),  # interval 1 is the same
        ((2, None), [1, 1, 1, 1, 1]),  # segments [0,1] [2,3] [4]: all recomputed, fewer inputs kept
        ((2, 3), [1, 1, 0, 1, 1]),  # segments [0,1] [3,4]; block 2 runs plainly
        ((2, 5), [1, 1, 0, 0, 0]),
        ((5, None), [1, 1, 1, 1, 1]),  # one segment: only the first block's input kept
    ],
)
def test_segmented_checkpointing_keeps_the_maths(model, reference, setting, recomputed):
    transformer, network = model
    loss_off, grads_off, calls_off = reference
    loss, grads, calls = loss_and_grads(transformer, network, setting)
    assert calls_off == [1] * LAYERS
    assert calls == [1 + r for r in recomputed]
    assert torch.equal(loss, loss_off)  # the forward runs the same ops in the same order
    assert any(g.abs().sum() > 0 for g in grads)
    for g, g_off in zip(grads, grads_off):
        torch.testing.assert_close(g, g_off, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("count", "recomputed"), [(5, [1] * 5), (2, [1, 1, 0, 0, 0]), (1, [1, 0, 0, 0, 0])])
def test_checkpointing_the_first_blocks_keeps_the_maths(model, reference, count, recomputed):
    """gradient_checkpointing_blocks: the first `count` blocks are recomputed in backward, the rest keep theirs."""
    transformer, network = model
    loss_off, grads_off, _ = reference

    def first_blocks(t: torch.nn.Module) -> None:
        t.enable_gradient_checkpointing(FirstBlocksCheckpointing(t.transformer_blocks, count))

    loss, grads, calls = loss_and_grads(transformer, network, first_blocks)
    assert calls == [1 + r for r in recomputed]
    assert torch.equal(loss, loss_off)
    for g, g_off in zip(grads, grads_off):
        torch.testing.assert_close(g, g_off, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("blocks", "expected"), [("auto", LAYERS), (2, 2), (0, 0), (99, LAYERS)])
def test_the_pinned_count_is_what_runs(model, blocks, expected):
    """configure_checkpointing from the config: auto on the CPU checkpoints every block; a count pins it."""
    transformer, _ = model
    config = load_config(RECIPE, {"resume_from_checkpoint": "none", "gradient_checkpointing_blocks": blocks})
    transformer.disable_gradient_checkpointing()
    try:
        configure_checkpointing(transformer, config, torch.device("cpu"))
        func = transformer._gradient_checkpointing_func if transformer.gradient_checkpointing else None
        if expected == LAYERS:
            assert transformer.gradient_checkpointing and not isinstance(func, FirstBlocksCheckpointing)
        elif expected == 0:
            assert not transformer.gradient_checkpointing
        else:
            assert isinstance(func, FirstBlocksCheckpointing) and func.count == expected
    finally:
        transformer.disable_gradient_checkpointing()


def test_a_pinned_count_with_segments_is_refused():
    with pytest.raises(ConfigError, match="gradient_checkpointing_blocks.*gradient_checkpointing_interval"):
        load_config(RECIPE, {"gradient_checkpointing_blocks": 4, "gradient_checkpointing_interval": 2})
    with pytest.raises(ConfigError, match="gradient_checkpointing_blocks"):
        load_config(RECIPE, {"gradient_checkpointing_blocks": -1})


def test_segment_plan():
    blocks = torch.nn.ModuleList(torch.nn.Identity() for _ in range(8))
    plan = SegmentCheckpointing(blocks, 2, 4)
    assert [plan.checkpointed(i) for i in range(8)] == [True, True, False, False] * 2
    assert all(SegmentCheckpointing(blocks, 3).checkpointed(i) for i in range(8))
    for interval, stride in ((1, None), (3, 2)):
        with pytest.raises(ValueError):
            SegmentCheckpointing(blocks, interval, stride)


def test_simpletuner_keys_are_accepted_and_checked():
    config = load_config(RECIPE, {"--gradient_checkpointing_interval": "2", "--gradient_checkpointing_segment_stride": 4})
    assert (config.gradient_checkpointing_interval, config.gradient_checkpointing_segment_stride) == (2, 4)
    assert load_config(RECIPE).gradient_checkpointing_interval is None  # the recipe: every block, as before
    with pytest.raises(ConfigError, match="must be at least '--gradient_checkpointing_interval' \\(3\\)"):
        load_config(RECIPE, {"gradient_checkpointing_interval": 3, "gradient_checkpointing_segment_stride": 2})
    with pytest.raises(ConfigError, match="needs '--gradient_checkpointing_interval' above 1"):
        load_config(RECIPE, {"gradient_checkpointing_segment_stride": 2})
    with pytest.raises(ConfigError, match="gradient_checkpointing_interval"):
        load_config(RECIPE, {"gradient_checkpointing_interval": 0})
    with pytest.raises(ConfigError, match="not supported by Terminus Relay"):
        load_config(RECIPE, {"gradient_checkpointing_offload_attention": True})  # still refused, by name
