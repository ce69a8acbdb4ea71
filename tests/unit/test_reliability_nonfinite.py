"""The non-finite step guard (relay_train/nonfinite.py) on a small model, on the CPU: a finite step is
bitwise the step it guards, a non-finite one is undone bitwise, and nothing syncs to decide."""

from __future__ import annotations

import pytest
import torch

from relay_train.nonfinite import StepGuard, nonfinite_tensors, step_tensors
from state_equal import assert_tree_equal  # tests/ is on sys.path (conftest rootdir)


def _model_and_optimizer(kind: str):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 128, generator=gen)), torch.nn.Parameter(torch.randn(16, generator=gen))]
    if kind == "bnb-adamw8bit":
        import bitsandbytes as bnb

        return params, bnb.optim.AdamW8bit(params, lr=1e-2)
    return params, torch.optim.AdamW(params, lr=1e-2)


def _step(params, optimizer, guard, grad_fill=None, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) if grad_fill is None else torch.full_like(p, grad_fill)
    loss = torch.stack([p.grad.sum() for p in params]).sum()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    snapshot = guard.before() if guard else None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return guard.after(snapshot, loss, norm) if guard else None


def _state(params, optimizer):
    state = {f"param{i}": p.detach().clone() for i, p in enumerate(params)}
    for i, p in enumerate(params):
        for k, v in optimizer.state[p].items():
            if k != "step":
                state[f"param{i}.{k}"] = v.clone() if torch.is_tensor(v) else v
    return state


@pytest.mark.parametrize("kind", ["adamw", "bnb-adamw8bit"])
def test_finite_steps_are_bitwise_the_unguarded_steps(kind):
    plain, plain_opt = _model_and_optimizer(kind)
    guarded, guarded_opt = _model_and_optimizer(kind)
    guard = StepGuard(guarded_opt, guarded, undo=True, use_loss=True)
    for seed in range(3):
        _step(plain, plain_opt, None, seed=seed)
        assert bool(_step(guarded, guarded_opt, guard, seed=seed))
    assert_tree_equal(_state(plain, plain_opt), _state(guarded, guarded_opt))


@pytest.mark.parametrize("kind", ["adamw", "bnb-adamw8bit"])
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_a_non_finite_step_is_undone_bitwise(kind, poison):
    params, optimizer = _model_and_optimizer(kind)
    guard = StepGuard(optimizer, params, undo=True, use_loss=True)
    _step(params, optimizer, guard, seed=0)
    before = _state(params, optimizer)
    ok = _step(params, optimizer, guard, grad_fill=poison)
    assert ok.dtype == torch.bool and ok.shape == () and not bool(ok)
    assert_tree_equal(before, _state(params, optimizer))
    assert bool(_step(params, optimizer, guard, seed=5))  # and training goes on from there
    assert not nonfinite_tensors({f"p{i}": p.detach() for i, p in enumerate(params)})


def test_an_update_that_overflows_the_adapter_is_undone():
    params, optimizer = _model_and_optimizer("adamw")
    guard = StepGuard(optimizer, params, undo=True, use_loss=True)
    _step(params, optimizer, guard, seed=0)
    before = _state(params, optimizer)
    optimizer.param_groups[0]["lr"] = 1e30  # finite gradients and weights, a norm past fp32's range
    assert not bool(_step(params, optimizer, guard, seed=1))
    assert_tree_equal(before, _state(params, optimizer))


def test_a_non_finite_first_step_leaves_no_optimizer_state():
    params, optimizer = _model_and_optimizer("adamw")
    initial = [p.detach().clone() for p in params]
    guard = StepGuard(optimizer, params, undo=True, use_loss=True)
    assert not bool(_step(params, optimizer, guard, grad_fill=float("nan")))
    assert len(optimizer.state) == 0 and all(torch.equal(a, p) for a, p in zip(initial, params))


def test_policy_stop_only_detects():
    params, optimizer = _model_and_optimizer("adamw")
    guard = StepGuard(optimizer, params, undo=False, use_loss=True)
    _step(params, optimizer, guard, seed=0)
    assert not bool(_step(params, optimizer, guard, grad_fill=float("nan")))
    assert nonfinite_tensors({"p0": params[0].detach()}) == ["p0"]


def test_step_tensors_cover_parameters_and_state_once():
    params, optimizer = _model_and_optimizer("bnb-adamw8bit")
    _step(params, optimizer, None)
    tensors = step_tensors(optimizer, params)
    assert len({id(t) for t in tensors}) == len(tensors)
    assert {id(p) for p in params} <= {id(t) for t in tensors}
    assert {id(optimizer.state[params[0]]["state1"])} <= {id(t) for t in tensors}


def test_the_nonfinite_policy_is_one_pure_decision():
    from relay_train.nonfinite import nonfinite_stop

    assert nonfinite_stop("stop", 5, 10, unread=0, in_a_row=0) is None  # nothing new: go on
    stop = nonfinite_stop("stop", 5, 10, unread=1, in_a_row=1)
    assert stop.startswith("step 10: the loss or gradient norm became NaN/inf (1 step(s)") and "{where}" in stop
    assert nonfinite_stop("skip", 5, 10, unread=2, in_a_row=4) is None  # skipped, under the limit
    diverged = nonfinite_stop("skip", 5, 10, unread=1, in_a_row=5)
    assert "5 non-finite steps in a row (max_nonfinite_steps 5)" in diverged.format(where="no checkpoint of this run is kept")
