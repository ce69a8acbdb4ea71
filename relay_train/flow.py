"""Rectified-flow maths for SD3 training (Esser et al. 2024, arXiv 2403.03206).

Pure functions of tensors and an explicit generator: no model, no I/O, no host syncs.
"""

from __future__ import annotations

import torch


def sample_logit_normal_sigmas(batch_size: int, generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
    """sigma = sigmoid(u), u ~ N(0, 1): the logit-normal density of SD3 §3.1 (m=0, s=1)."""
    u = torch.randn(batch_size, generator=generator, device=generator.device, dtype=torch.float32)
    return torch.sigmoid(u).to(device)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Resolution-dependent shift (SD3 §5.3.2): sigma' = s·sigma / (1 + (s − 1)·sigma)."""
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def sigmas_to_timesteps(sigmas: torch.Tensor) -> torch.Tensor:
    """The transformer is conditioned on t = sigma · 1000 (the scheduler's num_train_timesteps)."""
    return sigmas * 1000.0


def add_noise(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_sigma = (1 − sigma)·x0 + sigma·noise, sigma broadcast over (C, H, W)."""
    sigmas = sigmas.view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
    return (1.0 - sigmas) * latents + sigmas * noise


def flow_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity the model predicts: v = d x_sigma / d sigma = noise − x0."""
    return noise - latents


def flow_matching_loss(model_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error, computed in fp32 on purpose: bf16 MSE loses the small residuals late in training."""
    return torch.mean((model_pred.float() - target.float()) ** 2)


def normalize_latents(vae_latents: torch.Tensor, shift_factor: float, scaling_factor: float) -> torch.Tensor:
    """SD3's VAE space → diffusion space: (z − shift) · scale."""
    return (vae_latents - shift_factor) * scaling_factor


def caption_dropout_mask(batch_size: int, probability: float, generator: torch.Generator) -> torch.Tensor:
    """Bool mask, True where a sample's caption is swapped for the empty prompt (classifier-free guidance)."""
    draws = torch.rand(batch_size, generator=generator, device=generator.device)
    return draws < probability
