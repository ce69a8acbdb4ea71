"""Policy: what a config change between a checkpoint and the run resuming it means.

Pure: `classify_config_changes(saved, current, step)` compares the resolved config saved in a
checkpoint's config.json with this run's and returns one `ConfigChange` per differing key, each
allowed (applied, and logged as applied), refused (the checkpoint's state cannot honestly continue
under it: a clear error with the fix) or warned (applied, but the run is no longer the one the
checkpoint started). The trainer carries the decision out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Verdict = Literal["allowed", "refused", "warned"]

# Keys that may change freely between runs of one training: length, bookkeeping, validation, where
# results go. learning_rate is applied to the restored optimizer and schedule (see Trainer.restore).
ALLOWED = frozenset(
    {
        "max_train_steps",
        "num_train_epochs",
        "checkpointing_steps",
        "checkpoint_step_interval",
        "checkpoints_total_limit",
        "output_dir",
        "adapter_export_dtype",
        "init_lora_step",
        "vae_cache_ondemand",
        "resume_from_checkpoint",
        "learning_rate",
        "lr_warmup_steps",
        "gradient_checkpointing",
        "quantize_via",
        "gradient_checkpointing_interval",
        "gradient_checkpointing_segment_stride",  # memory/time only, same maths
        "lycoris_config",
        "data_backend_config",
        "vae_batch_size",
        "delete_problematic_images",
        "skip_file_discovery",
        "compress_disk_cache",
        "lora_rank",
        "lora_alpha",
        "init_lora",
        "hub_model_id",
        "push_to_hub",
        "push_checkpoints_to_hub",
        "hub_private",
        "super_squash_history",
        "report_to",
        "tracker_project_name",
        "tracker_run_name",
        "webhook_config",
        "webhook",
        "nonfinite_policy",
        "max_nonfinite_steps",
    }
)
ALLOWED_PREFIXES = ("validation_",)
ALLOWED_TOO = frozenset({"evaluation_type", "ema_validation", "disable_benchmark"})

# Keys whose change the restored state cannot follow, each with why and what to do instead.
REFUSED: dict[str, str] = {
    "pretrained_model_name_or_path": "the adapter was trained against another base model",
    "model_family": "the adapter belongs to another model family",
    "model_type": "the checkpoint holds another kind of adapter",
    "lora_type": "the checkpoint holds another kind of adapter",
    "lycoris": "the LyCORIS network's shape (algo, preset, dims, factors) differs, so its saved tensors do not fit",
    "base_model_precision": "the adapter was trained against a base of another precision",
    "optimizer": "the saved optimizer state belongs to another optimizer",
    "lr_scheduler": "the saved schedule state belongs to another schedule",
    "train_batch_size": "the batch size is part of the recipe the checkpoint was trained with",
    "gradient_accumulation_steps": "the effective batch size is part of the recipe the checkpoint was trained with",
    "seed": "the data order, noise and saved RNG state all come from the seed",
    "use_ema": "the checkpoint's EMA state and this run's disagree",
}
IGNORED = frozenset({"source_path"})  # where the config file lives says nothing about the run

_SECRET_HINTS = ("webhook", "token", "secret", "password", "key")


@dataclass(frozen=True)
class ConfigChange:
    key: str
    old: Any
    new: Any
    verdict: Verdict
    reason: str = ""

    def describe(self) -> str:
        old, new = (_shown(self.key, v) for v in (self.old, self.new))
        head = f"{self.key}: {old} -> {new}"
        return f"{head} ({self.reason})" if self.reason else head


_ABSENT = object()


def _shown(key: str, value: Any) -> str:
    if value is _ABSENT:
        return "(not set)"
    if any(hint in key for hint in _SECRET_HINTS) and value not in (None, "", []):
        return "(hidden)"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def verdict_for(key: str) -> Verdict:
    if key in REFUSED:
        return "refused"
    if key in ALLOWED or key in ALLOWED_TOO or key.startswith(ALLOWED_PREFIXES):
        return "allowed"
    return "warned"  # anything else changes the training the checkpoint started: say so


def classify_config_changes(
    saved: Mapping[str, Any], current: Mapping[str, Any], step: int, defaults: Mapping[str, Any] | None = None
) -> list[ConfigChange]:
    """Every key whose value differs, classified. `step` is the checkpoint's step: a max_train_steps
    below it is refused (the run would 'finish' at a later step than it asked for). A key the saved
    config lacks (written by an older version) counts as its default in `defaults`, when given."""
    defaults = defaults or {}
    changes = []
    for key in sorted(set(saved) | set(current)):
        if key in IGNORED:
            continue
        old = saved.get(key, defaults.get(key, _ABSENT))
        new = current.get(key, _ABSENT)
        if new is _ABSENT or old == new:  # a key this version no longer has: nothing to apply
            continue
        verdict, reason = verdict_for(key), REFUSED.get(key, "")
        if key == "max_train_steps" and isinstance(new, int) and 0 < new < step:
            verdict, reason = (
                "refused",
                (
                    f"the checkpoint is already at step {step}: set max_train_steps to "
                    f"{step} or more, or resume from an earlier checkpoint"
                ),
            )
        elif verdict == "warned":
            reason = "applied; the run continues with a setting the checkpoint was not trained with"
        changes.append(ConfigChange(key, old, new, verdict, reason))
    return changes


def refusal_message(folder: str, refused: list[ConfigChange]) -> str:
    lines = [f"cannot resume from {folder}: {len(refused)} setting(s) differ from the ones it was trained with:"]
    lines += [f"  - {c.describe()}" for c in refused]
    lines.append("  restore those settings, or set resume_from_checkpoint none (or another output_dir) to start a new run")
    return "\n".join(lines)
