import math

import torch

from relay_train import flow


def test_shift_matches_hand_values():
    sig = torch.tensor([0.0, 0.25, 0.5, 1.0])
    # s=3: 3·0.25 / (1 + 2·0.25) = 0.5 ; 3·0.5 / (1 + 2·0.5) = 0.75
    assert torch.allclose(flow.shift_sigmas(sig, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0]))
    assert torch.allclose(flow.shift_sigmas(sig, 1.0), sig)


def test_logit_normal_is_seeded_and_in_unit_interval():
    a = flow.sample_logit_normal_sigmas(1000, torch.Generator().manual_seed(1))
    b = flow.sample_logit_normal_sigmas(1000, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert a.min() > 0 and a.max() < 1
    assert abs(a.median().item() - 0.5) < 0.05  # sigmoid(N(0,1)) is symmetric about 1/2


def test_noising_target_and_loss_by_hand():
    x0 = torch.full((1, 1, 2, 2), 2.0)
    eps = torch.full((1, 1, 2, 2), -1.0)
    sigma = torch.tensor([0.25])
    noisy = flow.add_noise(x0, eps, sigma)  # 0.75·2 + 0.25·(−1) = 1.25
    assert torch.allclose(noisy, torch.full_like(x0, 1.25))
    target = flow.flow_target(x0, eps)  # −1 − 2 = −3
    assert torch.allclose(target, torch.full_like(x0, -3.0))
    # d/dσ of the path equals the target: finite difference
    h = 1e-3
    slope = (flow.add_noise(x0, eps, sigma + h) - noisy) / h
    assert torch.allclose(slope, target, atol=1e-3)
    pred = torch.full_like(x0, -1.0, dtype=torch.bfloat16)
    loss = flow.flow_matching_loss(pred, target)
    assert loss.dtype == torch.float32 and math.isclose(loss.item(), 4.0)


def test_timesteps_and_normalisation():
    assert torch.allclose(flow.sigmas_to_timesteps(torch.tensor([0.5])), torch.tensor([500.0]))
    z = torch.tensor([1.0609])
    assert torch.allclose(flow.normalize_latents(z, 0.0609, 1.5305), torch.tensor([1.5305]))


def test_caption_dropout_rate():
    mask = flow.caption_dropout_mask(10_000, 0.1, torch.Generator().manual_seed(0))
    assert 0.08 < mask.float().mean().item() < 0.12
    assert not flow.caption_dropout_mask(100, 0.0, torch.Generator().manual_seed(0)).any()
