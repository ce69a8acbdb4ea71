"""The LoKr forward paths (relay_train/lokr.py) on the tiny int8 SD3 transformer, on the CPU: the materialised
ΔW = kron(w1, w2) matches LyCORIS's bypass, runs where it is asked for, and trains adapters LyCORIS loads."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from relay_train.lokr import AUTO_PATH, lokr_forward_paths, lokr_modules, resolve_lokr_forward, set_lokr_forward
from relay_train.model import build_adapter_model
from relay_train.trainer import Hooks, build_trainer
from state_equal import assert_tree_equal  # tests/ is on sys.path (conftest rootdir)

RECIPE = Path(__file__).resolve().parents[2] / "configs/sd3/config.json"
SHORT = dict(checkpointing_steps=4, lr_warmup_steps=2, ema_update_interval=2, train_batch_size=2)


class CountCalls(TorchFunctionMode):
    """Counts torch.kron calls: the materialised path builds ΔW with it once per module per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.kron:
            self.calls["kron"] += 1
        return func(*args, **(kwargs or {}))


def inputs(batch: int = 2, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 16, 8, 8, generator=gen),
        encoder_hidden_states=torch.randn(batch, 231, 64, generator=gen),
        pooled_projections=torch.randn(batch, 64, generator=gen),
        timestep=torch.tensor([700.0, 300.0][:batch]),
        return_dict=False,
    )


@pytest.fixture
def model(make_config, tiny_model):
    """The tiny int8 transformer with the recipe's LoKr, w2 made non-zero (LyCORIS starts it at 0)."""
    built = build_adapter_model(make_config(**SHORT, max_train_steps=1), tiny_model, torch.device("cpu"), seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lokr_modules(built.network):
            m.lokr_w2.copy_(torch.randn(m.lokr_w2.shape, generator=gen) * 0.05)
    return built


def forward_backward(model, path: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    set_lokr_forward(model.network, path)
    model.network.zero_grad(set_to_none=True)
    out = model.transformer(**inputs())[0]
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.network.named_parameters()}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def test_materialized_matches_the_bypass_fp32(model):
    out_b, grads_b = forward_backward(model, "bypass")
    out_m, grads_m = forward_backward(model, "materialized")
    assert rel(out_m, out_b) < 1e-5
    assert grads_b.keys() == grads_m.keys() and any("lokr_w1" in n for n in grads_b)
    live = [n for n in grads_b if grads_b[n].abs().max() > 0]
    # the last block's context projections feed only the discarded context stream: zero in both
    assert len(live) >= len(grads_b) - 8
    for name in grads_b:  # every w1 and w2, each to 1e-5 of its own largest entry
        if name in live:
            assert rel(grads_m[name], grads_b[name]) < 1e-5, name
        else:
            assert not grads_m[name].any(), name


@pytest.mark.parametrize("shape", [((2, 2), (32, 32)), ((4, 4), (16, 64)), ((4, 4), (64, 16))])
def test_materialized_matches_the_bypass_bf16(shape):
    """Under bf16 autocast both forms round; each must stay within bf16's rounding of the fp64 truth, in the
    output and in the w1/w2 gradients. The base weight is zero, so the output is the adapter's alone."""
    from lycoris.modules.lokr import LokrModule

    (up, uq), (vp, vq) = shape
    gen = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(uq * vq, up * vp, bias=False)
    torch.nn.init.zeros_(base.weight)
    base.requires_grad_(False)
    lokr = LokrModule("t", base, lora_dim=10000, factor=up, full_matrix=True, bypass_mode=True)
    assert lokr.lokr_w1.shape == (up, uq) and lokr.lokr_w2.shape == (vp, vq)
    with torch.no_grad():
        lokr.lokr_w2.copy_(torch.randn(vp, vq, generator=gen) / vq**0.5)
    lokr.apply_to()
    x = torch.randn(64, uq * vq, generator=gen).bfloat16()
    weight = torch.randn(64, up * vp, generator=gen)  # the loss's weights: sum(y * weight)

    w1, w2 = (w.detach().double().requires_grad_(True) for w in (lokr.lokr_w1, lokr.lokr_w2))
    truth = x.double() @ torch.kron(w1, w2).T
    (truth * weight.double()).sum().backward()
    bf16_eps = 2.0**-8
    for path in ("bypass", "materialized"):
        set_lokr_forward(torch.nn.ModuleList([lokr]), path)
        lokr.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = base(x)
        assert got.dtype == torch.bfloat16
        (got.float() * weight).sum().backward()
        # the products round to bf16 (accumulation is fp32): a few ulps of the largest entry
        assert rel(got.double(), truth.detach()) < 4 * bf16_eps, path
        assert rel(lokr.lokr_w1.grad.double(), w1.grad) < 4 * bf16_eps, path
        assert rel(lokr.lokr_w2.grad.double(), w2.grad) < 4 * bf16_eps, path


def test_the_path_asked_for_is_the_path_run(make_config, tiny_model, caplog):
    """Counted from what the modules run, not from the log line: kron calls and LyCORIS bypass calls."""
    for choice in ("materialized", "bypass", "auto"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="relay_train.model"):
            built = build_adapter_model(
                make_config(**SHORT, max_train_steps=1, lokr_forward=choice), tiny_model, torch.device("cpu"), seed=0
            )
        modules = lokr_modules(built.network)
        bypass_calls = Counter()
        for m in modules:  # count LyCORIS's own bypass on each module (the test's probe, not our code)
            inner = m.bypass_forward_diff

            def counted(*args, _inner=inner, _calls=bypass_calls, **kwargs):
                _calls["bypass"] += 1
                return _inner(*args, **kwargs)

            m.bypass_forward_diff = counted
        built.transformer.disable_gradient_checkpointing()  # once per module per forward, no recomputation
        with CountCalls() as counter:
            built.transformer(**inputs())[0].sum().backward()
        expected = resolve_lokr_forward(choice, "cpu")
        if expected == "materialized":
            assert counter.calls["kron"] == len(modules) and bypass_calls["bypass"] == 0
        else:
            assert counter.calls["kron"] == 0 and bypass_calls["bypass"] == len(modules)
        assert lokr_forward_paths(built.network) == Counter({expected: len(modules)})
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("LoKr forward:")]
        assert lines == [f"LoKr forward: {len(modules)} {expected} (lokr_forward {choice} on cpu)"]


def test_auto_picks_materialized_on_cuda_and_the_measured_path_on_cpu():
    assert resolve_lokr_forward("auto", "cuda") == "materialized"
    assert resolve_lokr_forward("auto", "cpu") == AUTO_PATH["cpu"]
    assert resolve_lokr_forward("bypass", "cuda") == "bypass"
    with pytest.raises(ValueError, match="lokr_forward: 'fast'"):
        resolve_lokr_forward("fast", "cpu")


def test_a_bad_lokr_forward_is_a_config_error(make_config):
    from relay_train.config import ConfigError

    with pytest.raises(ConfigError, match="lokr_forward"):
        make_config(lokr_forward="fast")


def test_an_adapter_trained_materialized_loads_in_lycoris(make_config, tiny_model):
    import lycoris

    config = make_config(**SHORT, max_train_steps=4, adapter_export_dtype="fp32", lokr_forward="materialized")
    trainer = build_trainer(config)
    plain, _ = trainer.fit().exported
    assert lokr_forward_paths(trainer.model.network).keys() == {"materialized"}
    trainer.model.transformer.eval()
    with torch.no_grad():
        expected = trainer.model.transformer(**inputs(1))[0]

    fresh = build_adapter_model(make_config(**SHORT, max_train_steps=4, out="fresh"), tiny_model, torch.device("cpu"), seed=7)
    fresh.network.restore()  # a bare int8 transformer
    network, weights = lycoris.create_lycoris_from_weights(1.0, str(plain), fresh.transformer)
    network.apply_to()
    network.load_state_dict(weights)
    assert weights.keys() == trainer.model.network.state_dict().keys()  # LyCORIS's names, unchanged
    fresh.transformer.eval()
    with torch.no_grad():
        got = fresh.transformer(**inputs(1))[0]  # LyCORIS's own forward
    assert rel(got, expected) < 1e-5


def test_resume_is_bitwise_within_the_materialized_path(make_config):
    n = 8
    common = dict(SHORT, max_train_steps=n, optimizer="adamw", lokr_forward="materialized")
    straight = build_trainer(make_config(out="straight", **common))
    assert straight.fit().step == n
    config = make_config(out="halves", **common)
    first = build_trainer(config, hooks=Hooks(should_stop=lambda step: step == n // 2))
    assert first.fit().step == n // 2
    del first
    resumed = build_trainer(config)
    assert resumed.step == n // 2 and resumed.fit().step == n
    assert_tree_equal(straight.model.network.state_dict(), resumed.model.network.state_dict(), "adapter")
    assert_tree_equal(straight.optimizer.state_dict(), resumed.optimizer.state_dict(), "optimizer")


def test_the_adapter_sees_one_dtype_under_autocast():
    """bf16 autocast hands the wrapped linears fp32 (after the norms) and bf16 (after other matmuls); LyCORIS's
    compiled bypass recompiled on every flip until dynamo's limit. Both paths now run in the autocast dtype.
    (A bf16 base without quanto: quanto's CPU kernel takes no mixed dtypes; its CUDA one does.)"""
    from diffusers import SD3Transformer2DModel

    from relay_train.config import load_config
    from relay_train.demo.tiny_model import transformer_config
    from relay_train.model import attach_lokr

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(**transformer_config("tiny")).to(torch.bfloat16).requires_grad_(False)
    network = attach_lokr(transformer, load_config(RECIPE, {"resume_from_checkpoint": "none"}).lycoris)
    seen: dict[str, set] = {"linear": set(), "bypass": set()}
    modules = lokr_modules(network)
    for m in modules:
        m.org_module[0].register_forward_pre_hook(lambda _m, args: seen["linear"].add(args[0].dtype))
        inner = m.bypass_forward_diff

        def probe(h, *args, _inner=inner, **kwargs):
            seen["bypass"].add(h.dtype)
            return _inner(h, *args, **kwargs)

        m.bypass_forward_diff = probe
    linear = modules[0].org_module[0]
    for path in ("bypass", "materialized"):
        set_lokr_forward(network, path)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = transformer(**{k: v.bfloat16() if torch.is_tensor(v) else v for k, v in inputs().items()})[0]
            # CUDA's autocast runs layer_norm in fp32, so there the linears after a norm get fp32 inputs
            x = torch.randn(3, linear.in_features, generator=torch.Generator().manual_seed(0))
            by_dtype = [linear(x), linear(x.bfloat16())]
        assert torch.isfinite(out.float()).all()
        torch.testing.assert_close(by_dtype[0], by_dtype[1], rtol=0, atol=0)  # autocast rounds x to bf16 anyway
    assert seen["linear"] == {torch.float32, torch.bfloat16}
    assert seen["bypass"] == {torch.bfloat16}  # LyCORIS's bypass sees one dtype whatever the linear gets


@pytest.mark.slow
def test_regional_compile_trains_without_graph_breaks_or_dtype_recompiles(make_config, caplog):
    """transformer_compile on (auto on CUDA): every block compiled and checkpointed, with the materialised LoKr;
    the losses match eager over steps that change buckets, dynamo breaks no graph, never recompiles for a
    dtype, never reaches its recompile limit, and the compile time is logged once. (Minutes of CPU: inductor.)"""
    import torch._dynamo
    import torch._logging
    from torch._dynamo.utils import counters

    steps = 3
    common = dict(SHORT, max_train_steps=steps, optimizer="adamw", lokr_forward="materialized", use_ema=False)
    eager = build_trainer(make_config(out="eager", **common, transformer_compile="off"))
    expected = [eager.optimizer_step()[0] for _ in range(steps)]
    torch._dynamo.reset()
    counters.clear()
    torch._logging.set_logs(recompiles=True)
    speed_log = logging.getLogger("relay_train.speed")
    dynamo_log = logging.getLogger("torch._dynamo")  # torch's loggers never propagate to the root's handlers
    dynamo_log.addHandler(caplog.handler)
    try:
        # the level on our logger itself too: an earlier test in this process may have set a parent's (at_level
        # sets the capturing handler's level as well, so DEBUG both times: the recompile lines are DEBUG)
        with caplog.at_level(logging.DEBUG), caplog.at_level(logging.DEBUG, logger=speed_log.name):
            compiled = build_trainer(make_config(out="compiled", **common, transformer_compile="on"))
            losses = [compiled.optimizer_step()[0] for _ in range(steps)]
    finally:
        dynamo_log.removeHandler(caplog.handler)
        torch._logging.set_logs()
    assert all(block._compiled_call_impl is not None for block in compiled.model.transformer.transformer_blocks)
    torch.testing.assert_close(torch.stack(losses), torch.stack(expected), rtol=1e-4, atol=1e-6)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    messages = [r.getMessage() for r in caplog.records]
    recompiles = [m for m in messages if "Recompiling function" in m]
    assert recompiles, "the steps should include a new shape or grad mode (else this test checks nothing)"
    assert not [m for m in messages if "dtype mismatch" in m]
    assert not [m for m in messages if "recompile_limit" in m]
    lines = [m for m in messages if m.startswith("regional compile:")]
    state = f"disabled={speed_log.disabled} level={speed_log.getEffectiveLevel()} manager={logging.root.manager.disable}"
    assert len(lines) == 1 and "compiling 2 transformer blocks" in lines[0], (lines, state)
