"""The `deepspeed` strategy: ZeRO stage 2 over the adapter. What it keeps equal to `ddp`, what it
refuses (bnb AdamW8bit), and why it stays on DeepSpeed under an exact pin: docs/zero.md."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from relay_train.config import TrainConfig
from relay_train.optim import OPTIMIZER_SETTINGS

log = logging.getLogger(__name__)

ADAMW_STATE = ("exp_avg", "exp_avg_sq")  # the per-element tensors of torch AdamW's state (plus `step`)
# The version this was tested with. Older ones may lack `gradient_allreduce_op` or
# `managed_gradient_accumulation` and ignore them, which would silently average gradients or
# reduce at the wrong boundary.
DEEPSPEED_VERSION = "0.19.8"  # pinned exactly (pyproject): the state layout below reads ZeRO-2's internals
# (bit16_groups, single_partition_of_fp32_groups, _hp_mapping, _lazy_init_hp_params_optimizer_state);
# tests/unit/test_deepspeed_pin.py checks the pin and that those names still exist.
# Elements per gradient-reduction / weight all-gather bucket. DeepSpeed's default (5e8) allocates a
# 2 GB fp32 staging buffer per rank whatever the model's size; the seed's adapter has ~90M elements.
BUCKET_ELEMENTS = 50_000_000


def check_config(config: TrainConfig) -> list[str]:
    """Problems with running this recipe under ZeRO-2 (empty when it can run)."""
    problems = []
    if config.optimizer == "bnb-adamw8bit":
        problems.append(
            f"--optimizer {config.optimizer!r} with cluster strategy 'deepspeed' (ZeRO-2) is not supported: its "
            "block-quantized state cannot be consolidated into one exact optimizer.pt. Set --optimizer adamw, or "
            "cluster strategy 'ddp' to keep bnb-adamw8bit"
        )
    return problems


class ClippedAdamW(torch.optim.AdamW):
    """torch AdamW that clips the gradients it is about to apply. Under ZeRO those are this rank's slice
    of the flat gradient, so the trainer cannot clip them itself; `before_step` does it here."""

    before_step: Callable[[list[torch.Tensor]], None] | None = None

    @torch.no_grad()
    def step(self, closure=None):
        if self.before_step is not None:
            self.before_step([p.grad for g in self.param_groups for p in g["params"] if p.grad is not None])
        return super().step(closure)


class ZeroStage2:
    """The adapter's optimizer under DeepSpeed ZeRO-2, a relay_train.parallel.Update. Every method is
    called on every rank, in the same order: backward, step and both state methods run collectives.

    `optimizer` is the inner torch optimizer: the LR scheduler drives its `lr`, as with `ddp`.
    """

    def __init__(self, config: TrainConfig, network: torch.nn.Module, params: list[torch.nn.Parameter]):
        problems = check_config(config)
        if problems:
            from relay_train.config import ConfigError

            raise ConfigError(problems)
        import deepspeed
        from packaging.version import Version

        if Version(deepspeed.__version__) != Version(DEEPSPEED_VERSION):
            raise RuntimeError(
                f"strategy deepspeed is built for deepspeed=={DEEPSPEED_VERSION} (it reads ZeRO-2's "
                f"internal state layout); found {deepspeed.__version__}. Install "
                f"deepspeed=={DEEPSPEED_VERSION}, or use cluster strategy 'ddp'"
            )
        self.clip_method, self.clip_limit = config.grad_clip_method, config.max_grad_norm
        # adamw, adamw_bf16 and optimi-adamw are all torch AdamW on fp32 weights, each with its own settings
        self.optimizer = ClippedAdamW(params, lr=config.learning_rate, **OPTIMIZER_SETTINGS[config.optimizer])
        bucket = max(1, min(BUCKET_ELEMENTS, sum(p.numel() for p in params)))
        ds_config = {
            "train_micro_batch_size_per_gpu": config.train_batch_size,
            "gradient_accumulation_steps": config.gradient_accumulation_steps,
            "managed_gradient_accumulation": False,  # our loop: backward per micro-batch, step() per optimizer step
            "gradient_allreduce_op": "sum",  # losses are pre-weighted by each rank's share of the global batch
            "gradient_clipping": 0.0,  # ours, in ClippedAdamW.before_step
            "zero_optimization": {
                "stage": 2,
                "overlap_comm": False,
                "contiguous_gradients": True,
                "reduce_scatter": True,
                "reduce_bucket_size": bucket,
                "allgather_bucket_size": bucket,
            },
            "zero_allow_untested_optimizer": True,  # plain torch AdamW (a subclass of it)
            "steps_per_print": 1 << 62,
            "wall_clock_breakdown": False,
        }
        # torch.distributed is already up (Ray's TorchTrainer, or the caller); DeepSpeed joins that group.
        self.engine, _, _, _ = deepspeed.initialize(
            model=network, optimizer=self.optimizer, config=ds_config, dist_init_required=False
        )
        self.zero = self.engine.optimizer  # DeepSpeedZeroOptimizer
        self.params = params
        if [id(p) for p in self.zero.bit16_groups[0]] != [id(p) for p in params] or len(self.zero.bit16_groups) != 1:
            raise RuntimeError(
                "DeepSpeed reordered or regrouped the adapter's parameters, so optimizer.pt could not "
                f"be written in per-parameter order: use deepspeed {DEEPSPEED_VERSION}, or cluster strategy 'ddp'"
            )
        self.optimizer.before_step = self._clip
        self._zero_loss: torch.Tensor | None = None

    # -- the step ----------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor | None) -> None:
        """Backward through the adapter. Every rank must call this for every micro-batch (the gradient
        reduction runs in backward hooks), so a rank with nothing to train backpropagates a zero."""
        if loss is None:
            loss = torch.stack([p.sum() for p in self.params]).sum() * 0.0
        # The forward ran outside the engine (the adapter hooks into the transformer), so do what
        # engine.forward would have done first: reset ZeRO's per-backward bookkeeping.
        self.zero.clear_backward_seen_flag()
        self.engine.backward(loss, scale_wrt_gas=False)  # the trainer already divided by the accumulation

    def step(self) -> torch.Tensor:
        """Reduce, clip, step this rank's slice, all-gather the weights. Returns the global gradient L2
        norm before clipping (a tensor: no host sync)."""
        self.engine.step()
        norm = self.zero._global_grad_norm
        if norm is None or not torch.is_tensor(norm):  # DeepSpeed skipped the step (a NaN/inf gradient)
            return torch.tensor(float("nan") if norm is None else float(norm))
        return norm.detach().reshape(())

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def _clip(self, grads: list[torch.Tensor]) -> None:
        """Clip this rank's gradient slice as `relay_train.optim.clip_gradients` clips whole gradients:
        elementwise for `value` (the same on any slice), by the global norm for `norm`."""
        if self.clip_limit <= 0:
            return
        if self.clip_method == "value":
            torch._foreach_clamp_min_(grads, -self.clip_limit)
            torch._foreach_clamp_max_(grads, self.clip_limit)
            return
        norm = self.zero._global_grad_norm  # computed over every rank's slice just before this step
        coef = torch.clamp(self.clip_limit / (norm + 1e-6), max=1.0)  # as torch.nn.utils.clip_grad_norm_
        torch._foreach_mul_(grads, coef)

    # -- state -------------------------------------------------------------------------------------
    def consolidated_state_dict(self) -> dict:
        """The optimizer state in torch AdamW's per-parameter layout, gathered from every rank's slice.
        A collective: every rank calls it; every rank gets the whole state (rank 0 writes it)."""
        from deepspeed.utils import safe_get_full_optimizer_state

        inner = self.optimizer.state_dict()
        group = {k: v for k, v in inner["param_groups"][0].items() if k != "params"}
        group["params"] = list(range(len(self.params)))
        flat_state = next(iter(self.optimizer.state.values()), None)
        state = {}
        if flat_state:  # empty before the first step
            for i, param in enumerate(self.params):
                entry = {"step": flat_state["step"].clone()}
                for key in ADAMW_STATE:
                    entry[key] = safe_get_full_optimizer_state(param, key).detach().to("cpu").reshape(param.shape)
                state[i] = entry
        return {"state": state, "param_groups": [group]}

    def load_consolidated_state_dict(self, saved: dict) -> None:
        """Restore from `consolidated_state_dict`'s layout (or a `ddp` checkpoint's, which is the same):
        this rank keeps its slice of each tensor. Call after the adapter's weights are loaded: the fp32
        master copy of this rank's slice is refreshed from them here."""
        groups = saved["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            raise ValueError(
                f"optimizer state has {sum(len(g['params']) for g in groups)} parameter(s) in "
                f"{len(groups)} group(s); this adapter has {len(self.params)} in 1"
            )
        self.zero.refresh_fp32_params()
        for key, value in groups[0].items():
            if key != "params":
                self.optimizer.param_groups[0][key] = value
        if not saved["state"]:
            return
        flat = self.zero.single_partition_of_fp32_groups[0]
        entry = {"step": saved["state"][0]["step"].clone()}
        for key in ADAMW_STATE:
            buffer = torch.zeros_like(flat)  # padding at the end of the last slice stays zero
            for i, param in enumerate(self.params):
                mapping = param._hp_mapping  # None when no element of this parameter is in this rank's slice
                if mapping is None:
                    continue
                full = saved["state"][i][key].to(buffer.device, torch.float32).reshape(-1)
                lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
                buffer.narrow(0, hp.start, hp.numel).copy_(full.narrow(0, lp.start, lp.numel))
            entry[key] = buffer
        self.optimizer.state[flat] = entry
        # Re-link DeepSpeed's per-parameter views to the state just set (it links lazily after a step).
        self.zero._hp_optimizer_states_linked = False
        self.zero._lazy_init_hp_params_optimizer_state()
