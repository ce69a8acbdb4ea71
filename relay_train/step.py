"""One training micro-step: noise the latents, predict the velocity, return the loss.

Returns tensors only: no .item(), no logging, no saving. The loop decides when to pay for a sync.
"""

from __future__ import annotations

import contextlib

import torch

from relay_train.data.dataset import BucketTensors
from relay_train.flow import (
    add_noise,
    caption_dropout_mask,
    flow_matching_loss,
    flow_target,
    sample_logit_normal_sigmas,
    shift_sigmas,
    sigmas_to_timesteps,
)


def train_step(
    transformer: torch.nn.Module,
    batch: BucketTensors,
    empty_prompt: tuple[torch.Tensor, torch.Tensor],
    generator: torch.Generator,
    *,
    shift: float,
    caption_dropout: float,
    device: torch.device,
    dtype: torch.dtype,
    share: slice = slice(None),
) -> torch.Tensor:
    """Flow-matching loss, averaged over this rank's `share` of the global `batch`.

    All randomness comes from `generator`, a CPU generator, so the draws are the same on any device
    and its state checkpoints exactly. Every rank draws for the whole global batch and keeps its
    share: the run's noise does not depend on how many ranks split the batch.
    """
    bsz = batch.latents.shape[0]
    # Draw in a fixed order regardless of the options, so the generator's stream never depends on them.
    drop = caption_dropout_mask(bsz, caption_dropout, generator)[share]
    noise = torch.randn(batch.latents.shape, generator=generator, dtype=torch.float32)[share]
    sigmas = shift_sigmas(sample_logit_normal_sigmas(bsz, generator), shift)[share]
    latents = batch.latents[share]
    if latents.shape[0] == 0:  # a partial global batch left this rank nothing; the draws above still count
        return torch.zeros((), device=device)

    prompt = torch.where(drop[:, None, None], empty_prompt[0], batch.prompt_embeds[share])
    pooled = torch.where(drop[:, None], empty_prompt[1], batch.pooled_embeds[share])

    latents, noise, sigmas = latents.to(device), noise.to(device), sigmas.to(device)
    noisy = add_noise(latents, noise, sigmas)  # x_σ = (1 − σ)·x0 + σ·ε
    autocast = (
        torch.autocast("cuda", dtype=dtype) if device.type == "cuda" and dtype != torch.float32 else contextlib.nullcontext()
    )
    with autocast:
        pred = transformer(
            hidden_states=noisy.to(dtype),
            encoder_hidden_states=prompt.to(device, dtype),
            pooled_projections=pooled.to(device, dtype),
            timestep=sigmas_to_timesteps(sigmas),
            return_dict=False,
        )[0]
    return flow_matching_loss(pred, flow_target(latents, noise))  # ‖v̂ − (ε − x0)‖², fp32
