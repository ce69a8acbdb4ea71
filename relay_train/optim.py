"""Optimizer, LR schedule, gradient clipping and the adapter EMA."""

from __future__ import annotations

import torch

from relay_train.config import TrainConfig

ADAMW_BETAS, ADAMW_EPS, ADAMW_WEIGHT_DECAY = (0.9, 0.999), 1e-8, 1e-2  # SimpleTuner's torch-adamw defaults

# SimpleTuner 4.10.1's settings for each optimizer Relay offers (helpers/training/optimizer_param.py).
# All are AdamW updates on the adapter's fp32 weights: adamw_bf16 and optimi-adamw run as torch AdamW
# with their own settings. SimpleTuner's AdamWBF16 keeps bf16 weights and moments (compensating the
# rounding); optimi's Kahan summation applies only to low-precision weights, so on fp32 weights its
# update is plain AdamW with decoupled weight decay, as torch's.
OPTIMIZER_SETTINGS: dict[str, dict] = {
    "adamw": {"betas": ADAMW_BETAS, "eps": ADAMW_EPS, "weight_decay": ADAMW_WEIGHT_DECAY},
    "adamw_bf16": {"betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 1e-2},
    "optimi-adamw": {"betas": (0.9, 0.99), "eps": 1e-6, "weight_decay": 0.0},
    "bnb-adamw8bit": {"betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 1e-2},
}


def build_optimizer(config: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if config.optimizer not in OPTIMIZER_SETTINGS:
        raise ValueError(f"--optimizer {config.optimizer!r} is not supported")
    kwargs = {"lr": config.learning_rate, **OPTIMIZER_SETTINGS[config.optimizer]}
    if config.optimizer == "bnb-adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The multipliers of diffusers' schedules of the same names, so a SimpleTuner user sees the same LR curve.

    SimpleTuner turns `constant` with warmup steps into `constant_with_warmup`; so does this. polynomial
    decays from the peak to lr_end: lr(t) = (lr - lr_end)·(1 - t)^lr_power + lr_end, t the fraction of
    the steps after warmup."""
    from diffusers.optimization import get_polynomial_decay_schedule_with_warmup, get_scheduler

    name = config.lr_scheduler
    if name == "constant" and config.lr_warmup_steps > 0:
        name = "constant_with_warmup"
    if name == "polynomial":
        return get_polynomial_decay_schedule_with_warmup(
            optimizer,
            num_warmup_steps=config.lr_warmup_steps,
            num_training_steps=total_steps,
            lr_end=config.lr_end,
            power=config.lr_power,
        )
    return get_scheduler(
        name,
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
