"""What a resolved config tells a person: the start-up log's notes on how SimpleTuner's semantics are
mapped (one rule per topic, each a pure function of the TrainConfig returning a line or None), and the
run's one summary (config_summary: the ledger, the run-started message and the model card)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from relay_train.config import TrainConfig


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:37] + "...")
    return str(value)


def _note_lycoris_dims(c: TrainConfig) -> str | None:
    if not {"lora_rank", "lora_alpha"} & c.model_fields_set:
        return None
    dims = (
        f"linear_dim={c.lycoris.linear_dim}, linear_alpha={c.lycoris.linear_alpha:g}"
        if c.lycoris
        else "linear_dim and linear_alpha"
    )
    alpha = "unset" if c.lora_alpha is None else f"{c.lora_alpha:g}"
    return (
        f"--lora_rank={c.lora_rank}, --lora_alpha={alpha} are ignored with "
        f"--lora_type=lycoris: the LyCORIS file's {dims} set the adapter"
    )


def _note_quantize(c: TrainConfig) -> str | None:
    if c.base_model_precision == "no_change":
        return None
    where = (
        "on the CPU, then moved to the accelerator (lower peak accelerator memory, slower start)"
        if c.quantize_via == "cpu"
        else "after it is moved to the accelerator"
    )
    return f"--quantize_via={c.quantize_via}: the base transformer is quantized to int8 {where}"


def _note_benchmark(c: TrainConfig) -> str | None:
    if "disable_benchmark" not in c.model_fields_set:
        return None
    effect = "is skipped" if c.disable_benchmark else "is rendered once by the validation pool as the reference"
    return (
        f"--disable_benchmark={_show(c.disable_benchmark)}: SimpleTuner's step-0 validation "
        f"of the base model (the 'benchmark') {effect}"
    )


def _note_length(c: TrainConfig) -> str | None:
    if c.max_train_steps > 0 and c.num_train_epochs > 0 and "num_train_epochs" in c.model_fields_set:
        return f"--num_train_epochs={c.num_train_epochs} is ignored: --max_train_steps={c.max_train_steps} sets the run length"
    return None


def _note_clipping(c: TrainConfig) -> str | None:
    if c.max_grad_norm == 0:
        return "--max_grad_norm=0: gradient clipping is off"
    if c.grad_clip_method == "value":
        return (
            f"--grad_clip_method=value: each gradient element is clamped to "
            f"[-{c.max_grad_norm:g}, {c.max_grad_norm:g}] (--max_grad_norm), not the global norm"
        )
    return None


OPTIMIZER_NOTES = {
    "adamw_bf16": "torch AdamW with SimpleTuner's adamw_bf16 settings (betas 0.9/0.999, eps 1e-6, weight decay "
    "1e-2); the adapter's weights and moments stay fp32 where SimpleTuner keeps them in bf16, so "
    "each update is the same AdamW step computed without bf16 rounding",
    "optimi-adamw": "torch AdamW with SimpleTuner's optimi-adamw settings (betas 0.9/0.99, eps 1e-6, weight decay "
    "0); the adapter's weights are fp32, where optimi's Kahan summation does nothing, so the "
    "update is optimi's",
    "adamw": "torch AdamW (SimpleTuner's torch-adamw: betas 0.9/0.999, eps 1e-8, weight decay 1e-2)",
    "bnb-adamw8bit": "bitsandbytes AdamW8bit (betas 0.9/0.999, eps 1e-6, weight decay 1e-2, as SimpleTuner)",
}


def _note_optimizer(c: TrainConfig) -> str | None:
    return f"--optimizer={c.optimizer}: {OPTIMIZER_NOTES[c.optimizer]}"


def _note_schedule(c: TrainConfig) -> str | None:
    if c.lr_scheduler == "constant" and c.lr_warmup_steps > 0:
        return (
            f"--lr_scheduler=constant with --lr_warmup_steps={c.lr_warmup_steps} runs as constant_with_warmup, "
            "as SimpleTuner does"
        )
    if c.lr_scheduler == "cosine":
        return (
            "--lr_scheduler=cosine: diffusers' cosine (linear warmup over lr_warmup_steps, then half a cosine "
            "to 0 at the last step); SimpleTuner 4.10.1's own cosine restarts every lr_warmup_steps"
        )
    if c.lr_scheduler == "polynomial":
        return (
            f"--lr_scheduler=polynomial: warmup over {c.lr_warmup_steps} steps, then "
            f"(lr - lr_end)·(1 - t)^{c.lr_power:g} + lr_end down to --lr_end={c.lr_end:g}"
        )
    return None


def _note_vae_ondemand(c: TrainConfig) -> str | None:
    if not c.vae_cache_ondemand:
        return None
    return (
        "--vae_cache_ondemand=true: Relay still encodes each image's latents once, before the first step, "
        "and reuses them on resume; the latents are the same, only the time they are computed differs"
    )


def _note_dtype(c: TrainConfig) -> str | None:
    if c.base_model_precision == "no_change" or c.mixed_precision == "bf16":
        return None
    dtype = "bf16" if c.base_model_default_dtype == "bf16" else "fp32"
    return (
        f"--base_model_default_dtype={c.base_model_default_dtype}: the quantized base's other weights run in "
        f"{dtype} on the accelerator (fp32 on the CPU)"
    )


def _note_init_lora(c: TrainConfig) -> str | None:
    if c.init_lora is None:
        return None
    start = "the step in its global_step metadata" if c.init_lora_step is None else f"step {c.init_lora_step}"
    return (
        f"--init_lora: a fresh run starts from the adapter's weights at {start} (the LR schedule and the "
        "step count continue from there); an existing checkpoint in output_dir takes precedence"
    )


def _note_text_embeds(c: TrainConfig) -> str | None:
    default = next((b for b in c.data_backends if b.dataset_type == "text_embeds" and b.default and not b.disabled), None)
    linked = [b for b in c.data_backends if b.text_embeds and default and b.text_embeds != default.id]
    if not linked:
        return None
    where = ", ".join(f"{c.data_backend_config.name}[{b.id}].text_embeds={b.text_embeds!r}" for b in linked)
    return (
        f"{where}: Relay caches each caption's embeddings once, in the default text_embeds backend "
        f"{default.id!r}; the embeddings are the same whichever cache holds them"
    )


def _note_validation_cadence(c: TrainConfig) -> str | None:
    if not c.validation_every or c.validation_cadence == c.validation_every:
        return None
    return (
        f"validation renders committed checkpoints only: with --checkpoint_step_interval={c.checkpoint_step_interval} "
        f"and --validation_step_interval={c.validation_every} it runs every {c.validation_cadence} steps; make the "
        "validation interval a multiple of the checkpoint interval to say so in the config"
    )


def launch_only_note(c: TrainConfig) -> str | None:
    """The settings only the run's steward carries out (relay launch, jobs/train.py): relay train says so
    at start-up instead of ignoring them silently."""
    settings = [f"--{key}" for key in ("push_to_hub", "push_checkpoints_to_hub") if getattr(c, key)]
    settings += ["--webhook_config"] if c.webhook_config is not None else []
    settings += [f"--report_to={c.report_to}"] if c.report_to != "none" else []
    settings += ["validation (--validation_prompt...)"] if c.validation_every else []
    if not settings:
        return None
    return (
        f"{', '.join(settings)}: carried out only under `relay launch` and `jobs/train.py` (the run's steward "
        "uploads to the Hub, posts to webhooks, logs to W&B and validates); `relay train` trains and exports "
        "here, and none of these happen in this run"
    )


NOTE_RULES = (
    _note_validation_cadence,
    _note_text_embeds,
    _note_lycoris_dims,
    _note_quantize,
    _note_benchmark,
    _note_length,
    _note_clipping,
    _note_optimizer,
    _note_schedule,
    _note_vae_ondemand,
    _note_dtype,
    _note_init_lora,
)


def config_summary(config: TrainConfig) -> dict[str, str]:
    """What a reader needs to reproduce the run (the ledger's run_started, the webhook, the Hub card): a fixed
    list of keys, so no path beyond the base model and no secret leaks."""
    rows = {
        "base model": config.pretrained_model_name_or_path,
        "base precision": config.base_model_precision,
        "adapter": f"LyCORIS {config.lycoris.algo}" if config.lycoris else config.lora_type,
        "optimizer": f"{config.optimizer}, lr {config.learning_rate:g}, {config.lr_scheduler} (warmup {config.lr_warmup_steps})",
        "batch": f"{config.train_batch_size} per device x {config.gradient_accumulation_steps} accumulation",
        "clipping": f"{config.grad_clip_method} {config.max_grad_norm:g}",
        "flow schedule shift": f"{config.flow_schedule_shift:g}",
        "EMA": f"decay {config.ema_decay:g} every {config.ema_update_interval} steps" if config.use_ema else "off",
        "resolution": f"{config.resolution} ({config.resolution_type})",
        "mixed precision": config.mixed_precision,
        "checkpointing": f"every {config.checkpointing_steps} steps",
    }
    if config.lycoris:
        lyco = config.lycoris
        rows["adapter"] += f" (factor {lyco.factor}, linear_dim {lyco.linear_dim}, linear_alpha {lyco.linear_alpha:g})"
    return rows
