from types import SimpleNamespace

import pytest
import torch

from relay_train.optim import AdapterEMA, build_scheduler, clip_gradients


def _run(opt_factory, steps, state=None, params=None):
    params = params or [torch.nn.Parameter(torch.linspace(-1, 1, 8192).reshape(64, 128))]
    opt = opt_factory(params)
    if state is not None:
        opt.load_state_dict(state)
    for s in steps:
        params[0].grad = torch.randn(params[0].shape, generator=torch.Generator().manual_seed(s))
        opt.step()
    return params, opt


def test_bnb_adamw8bit_resumes_bitwise_with_8bit_state():
    """Tensors of ≥4096 elements get bitsandbytes' blockwise 8-bit state; a state_dict round trip is exact."""
    bnb = pytest.importorskip("bitsandbytes")

    def factory(p):
        return bnb.optim.AdamW8bit(p, lr=1e-2)

    straight, opt = _run(factory, range(10))
    assert opt.state[straight[0]]["state1"].dtype == torch.uint8
    half, opt_half = _run(factory, range(5))
    state = opt_half.state_dict()
    resumed, _ = _run(factory, range(5, 10), state=state, params=[torch.nn.Parameter(half[0].detach().clone())])
    assert torch.equal(straight[0], resumed[0])


def test_ema_lerps_towards_the_weights():
    net = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema = AdapterEMA(net, decay=0.9)
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema.update(net)
    ema.update(net)
    # 0 → 0.1 → 0.19
    assert torch.allclose(ema.state_dict()["weight"], torch.full((1, 2), 0.19))


def test_clipping_by_value_and_by_norm():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([3.0, -4.0, 0.05, 0.0])
    clip_gradients([p], "value", 0.1)
    assert torch.equal(p.grad, torch.tensor([0.1, -0.1, 0.05, 0.0]))
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    clip_gradients([p], "norm", 1.0)
    assert torch.allclose(p.grad.norm(), torch.tensor(1.0), atol=1e-5)
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    clip_gradients([p], "norm", 0.0)  # 0 disables
    assert torch.equal(p.grad, torch.tensor([3.0, 4.0, 0.0, 0.0]))


@pytest.mark.parametrize(
    "name, expected",
    [
        ("constant_with_warmup", [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]),
        ("constant", [1.0] * 8),
        # warmup 4, then half a cosine over the remaining 4 steps: 1, cos²-shaped down to 0
        ("cosine", [0.0, 0.25, 0.5, 0.75, 1.0, 0.853553, 0.5, 0.146447]),
    ],
)
def test_lr_schedules(name, expected):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    config = SimpleNamespace(lr_scheduler=name, lr_warmup_steps=0 if name == "constant" else 4)
    sched = build_scheduler(config, opt, total_steps=8)
    got = []
    for _ in range(8):
        got.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert got == pytest.approx(expected, abs=1e-6)


def test_optimizers_use_simpletuners_settings_for_each():
    from relay_train.optim import build_optimizer

    params = [torch.nn.Parameter(torch.zeros(3))]
    expected = {
        "adamw_bf16": ((0.9, 0.999), 1e-6, 1e-2),
        "optimi-adamw": ((0.9, 0.99), 1e-6, 0.0),
        "adamw": ((0.9, 0.999), 1e-8, 1e-2),
    }
    for name, (betas, eps, decay) in expected.items():
        opt = build_optimizer(SimpleNamespace(optimizer=name, learning_rate=1e-3), params)
        group = opt.param_groups[0]
        assert isinstance(opt, torch.optim.AdamW) and group["lr"] == 1e-3, name
        assert (group["betas"], group["eps"], group["weight_decay"]) == (betas, eps, decay), name
    bnb = pytest.importorskip("bitsandbytes")
    opt = build_optimizer(SimpleNamespace(optimizer="bnb-adamw8bit", learning_rate=1e-3), params)
    assert isinstance(opt, bnb.optim.AdamW8bit) and opt.param_groups[0]["eps"] == 1e-6


def test_optimi_adamw_on_fp32_weights_is_the_optimi_update():
    """optimi's AdamW (decouple_lr False, no Kahan summation on fp32): m, v as Adam's; p -= lr*(m̂/(√v̂+eps) + wd·p)."""
    from relay_train.optim import build_optimizer

    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = build_optimizer(SimpleNamespace(optimizer="optimi-adamw", learning_rate=0.1), [p])
    g = torch.tensor([0.5, 0.25])
    p.grad = g.clone()
    opt.step()
    m, v = 0.1 * g, 0.01 * g * g  # one step of (1-b1)·g and (1-b2)·g², b = (0.9, 0.99)
    m_hat, v_hat = m / 0.1, v / 0.01
    assert torch.allclose(p.detach(), torch.tensor([1.0, -2.0]) - 0.1 * m_hat / (v_hat.sqrt() + 1e-6))


def test_polynomial_decays_to_lr_end_and_constant_with_warmup_is_mapped():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    config = SimpleNamespace(lr_scheduler="polynomial", lr_warmup_steps=2, lr_end=0.1, lr_power=2.0)
    sched = build_scheduler(config, opt, total_steps=6)
    got = []
    for _ in range(7):
        got.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    # warmup 0, 0.5; then (1 - 0.1)·(1 - t)² + 0.1 with t = (step - 2) / 4
    assert got == pytest.approx([0.0, 0.5, 1.0, 0.60625, 0.325, 0.15625, 0.1], abs=1e-6)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(SimpleNamespace(lr_scheduler="constant", lr_warmup_steps=2), opt, total_steps=4)
    assert sched.get_last_lr()[0] == 0.0  # SimpleTuner runs constant with warmup steps as constant_with_warmup
