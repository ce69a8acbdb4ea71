"""Optimizer, LR schedule, gradient clipping and the adapter EMA."""

from __future__ import annotations

import torch

from relay_train.config import TrainConfig

ADAMW_BETAS, ADAMW_EPS, ADAMW_WEIGHT_DECAY = (0.9, 0.999), 1e-8, 1e-2  # SimpleTuner's AdamW defaults


def build_optimizer(config: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    kwargs = dict(lr=config.learning_rate, betas=ADAMW_BETAS, eps=ADAMW_EPS, weight_decay=ADAMW_WEIGHT_DECAY)
    if config.optimizer == "bnb-adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    raise ValueError(f"--optimizer {config.optimizer!r} is not supported")


def build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The multipliers of diffusers' schedules of the same names, so a SimpleTuner user sees the same LR curve."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=total_steps,
    )


def clip_gradients(params: list[torch.nn.Parameter], method: str, limit: float) -> torch.Tensor:
    """`value` clamps each gradient element to ±limit; `norm` rescales to a global L2 norm ≤ limit.

    Returns the global L2 norm before clipping, as a tensor: reading it would sync, so the loop does
    that only when it reports."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if limit > 0 and method == "norm":
        return torch.nn.utils.clip_grad_norm_(params, limit)
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    if limit > 0:
        torch.nn.utils.clip_grad_value_(params, limit)
    return norm


class AdapterEMA:
    """Exponential moving average of the adapter's tensors: shadow ← decay·shadow + (1 − decay)·param.

    Keyed by the network's state_dict names, so the EMA exports with the same LyCORIS names.
    """

    def __init__(self, network: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in network.state_dict().items()}

    @torch.no_grad()
    def update(self, network: torch.nn.Module) -> None:
        names, current = zip(*network.state_dict().items())
        torch._foreach_lerp_([self.shadow[n] for n in names], [c.float() for c in current], 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.shadow):
            raise ValueError("EMA state does not match this adapter's tensors")
        self.shadow = {k: v.clone().float() for k, v in state.items()}
