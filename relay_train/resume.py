"""The resume policy: which checkpoint a run continues from, and what a config change between that
checkpoint and the run means.

`classify_config_changes(saved, current, step)` (pure) compares the resolved config saved in a
checkpoint's config.json with this run's and returns one `ConfigChange` per differing key, each
allowed (applied, and logged as applied), refused (the checkpoint's state cannot honestly continue
under it: a clear error with the fix) or warned (applied, but the run is no longer the one the
checkpoint started). `check_resume` carries that out for one checkpoint; `resume_point` picks the
checkpoint (resume_from_checkpoint); `continue_from_init_lora` starts a fresh run at an adapter
file's step. The Trainer calls them; its loop holds none of this.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from relay_train import checkpoint as ckpt
from relay_train.config import TrainConfig

if TYPE_CHECKING:
    from relay_train.trainer import Trainer

log = logging.getLogger(__name__)

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
        "cpu_threads",  # speed only, same maths
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
        "gradient_checkpointing_blocks",
        "lokr_forward",  # same maths; only the float rounding of the adapter's product differs
        "transformer_compile",
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


# -- carrying it out ---------------------------------------------------------------------------------


def check_resume(config: TrainConfig, total_steps: int, folder: Path, state: ckpt.CheckpointPayload) -> bool:
    """Classify every difference between the checkpoint's saved config and this run's; refuse, warn
    or log each. Returns whether learning_rate changed (the restored optimizer must be told)."""
    try:
        saved = json.loads(state.config_json)
        assert isinstance(saved, dict)
    except (ValueError, AssertionError) as exc:
        raise ckpt.CheckpointUnloadableError(f"{folder}: {ckpt.CONFIG} is not a JSON object of settings") from exc
    defaults = {
        k: json.loads(json.dumps(f.default, default=str))
        for k, f in TrainConfig.model_fields.items()
        if not f.is_required() and f.default_factory is None
    }
    if isinstance(saved.get("lycoris"), dict) and config.lycoris is not None:  # as this version reads it
        try:
            saved["lycoris"] = type(config.lycoris).model_validate(saved["lycoris"]).model_dump(mode="json")
        except ValueError:
            pass  # no longer valid at all: compared as saved, and refused if it differs
    changes = classify_config_changes(saved, config.resolved_dict(), state.step, defaults)
    refused = [c for c in changes if c.verdict == "refused"]
    if total_steps < state.step and not any(c.key == "max_train_steps" for c in refused):
        refused.append(
            ConfigChange(
                "total steps",
                state.step,
                total_steps,
                "refused",
                "the run would end before the checkpoint's step: raise max_train_steps or num_train_epochs",
            )
        )
    if refused:
        raise ckpt.CheckpointError(refusal_message(str(folder), refused))
    for change in changes:
        if change.verdict == "allowed":
            log.info("resume: %s: applied", change.describe())
        else:
            log.warning("resume: %s", change.describe())
    return any(c.key == "learning_rate" for c in changes)


def apply_learning_rate(config: TrainConfig, optimizer, scheduler) -> None:
    """The restored optimizer and schedule carry the checkpoint's learning rate; set this run's, at the
    schedule's current position, so the config saved with the next checkpoint is the one that ran."""
    lr = config.learning_rate
    scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
    for group in optimizer.param_groups:
        group["initial_lr"] = lr
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas:  # LambdaLR: lr = base · λ(step), as its step() computes it
        current = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, lambdas)]
        for group, value in zip(optimizer.param_groups, current):
            group["lr"] = value
        scheduler._last_lr = current
    log.info(
        "resume: learning rate %g applied to the restored optimizer (now %g at step %d)",
        lr,
        optimizer.param_groups[0]["lr"],
        scheduler.last_epoch,
    )


def restore_newest_loadable(trainer: Trainer, folder: Path, store: ckpt.CheckpointIO | None) -> Path:
    """Restore `folder`; with a store ('latest'), a checkpoint whose files match their hashes yet do not load
    is skipped like any other defect, for the next older one (each tried once, newest first)."""
    scan = getattr(store, "scan", None)
    step = ckpt.checkpoint_step(folder)
    candidates = [folder, *(f for f, reason in (scan() if scan else []) if reason is None and ckpt.checkpoint_step(f) < step)]
    for candidate in candidates[:-1]:
        try:
            trainer.restore(candidate)
            return candidate
        except ckpt.CheckpointUnloadableError as exc:
            log.warning("skipping checkpoint %s: %s", candidate, str(exc).removeprefix(f"{candidate}: "))
    trainer.restore(candidates[-1])  # the oldest: its error, if any, is the run's
    return candidates[-1]


def continue_from_init_lora(trainer: Trainer, config: TrainConfig) -> None:
    """A fresh run from an adapter file starts at init_lora_step, or the file's global_step when that is
    unset (as SimpleTuner): the step count and the LR schedule continue from there; data order starts anew."""
    from relay_train.model import adapter_file_step

    start = config.init_lora_step if config.init_lora_step is not None else adapter_file_step(config.init_lora) or 0
    if start == 0:
        return
    if start >= trainer.total_steps:
        raise ValueError(
            f"--init_lora {config.init_lora}: it was saved at step {start}, at or past this run's "
            f"{trainer.total_steps} steps. Set --init_lora_step 0 to train it anew, or raise "
            "--max_train_steps to continue it"
        )
    trainer.step = start
    trainer.scheduler.last_epoch = start - 1
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": here on purpose
        warnings.simplefilter("ignore", UserWarning)
        trainer.scheduler.step()  # sets the LR of step `start`
    log.info("init_lora: continuing from step %d of %d", start, trainer.total_steps)


def resume_point(config: TrainConfig, store: ckpt.CheckpointIO) -> Path | None:
    """resume_from_checkpoint: 'none' → fresh; 'latest' → newest usable checkpoint, if any; else that path.

    'latest' over a store that holds checkpoint folders none of which can be resumed is refused, listing
    each and why: starting again from step 0 would silently replace them."""
    choice = config.resume_from_checkpoint
    scan = getattr(store, "scan", None)  # LocalCheckpointStore; another CheckpointIO only has latest()
    if choice == "none":
        found = scan() if scan else []
        if found:
            log.warning(
                "resume_from_checkpoint none: starting at step 0 in %s, which holds %d checkpoint folder(s) "
                "from an earlier run (%s); they are replaced or pruned as this run saves",
                config.output_dir,
                len(found),
                ", ".join(f.name for f, _ in found[:5]),
            )
        return None
    if choice == "latest":
        if scan is None:
            return store.latest()
        found = scan()
        usable = [folder for folder, reason in found if reason is None]
        for folder, reason in found:
            if reason is not None and (not usable or ckpt.checkpoint_step(folder) > ckpt.checkpoint_step(usable[0])):
                log.warning("skipping checkpoint %s: %s", folder, reason)
        if usable or not found:
            return usable[0] if usable else None
        lines = [f"{config.output_dir} holds {len(found)} checkpoint folder(s) and none can be resumed:"]
        lines += [f"  - {folder.name}: {reason}" for folder, reason in found]
        lines.append(
            "  set resume_from_checkpoint none (--set resume_from_checkpoint=none) to start a new run "
            "that replaces them, or move them away"
        )
        raise ckpt.CheckpointError("\n".join(lines))
    folder = Path(choice)
    if not folder.is_dir():
        folder = Path(config.output_dir) / choice  # SimpleTuner also accepts a bare "checkpoint-N"
    return folder  # Trainer.restore verifies it against its manifest (one hash pass)
