"""The Hub mirror's decisions, as pure functions of plain data: no client, no clock, no files.

`plan_round(settings, view, pending, images)` takes what the repo holds (a `HubView`, listed once) and
what is waiting (committed checkpoint steps, validation images) and returns the one commit to make
next (a `Round`), or None when the repo already matches. `Round.after(view)` is what the repo holds
once that commit lands, so the executor (orchestrator/hub.py) never lists again after a success.
Retention is relay_train.checkpoint's rule (`keep_newest`); when to retry is policy.retry_delay.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from relay_train import checkpoint as ckpt
from relay_train.config import TrainConfig
from relay_train.config.notes import config_summary
from relay_train.artifacts import (
    HUB_CARD as CARD,
    HUB_CHECKPOINTS as CHECKPOINTS,  # noqa: F401 - hub and hub_card read the Hub's names through here
    HUB_VALIDATION as VALIDATION,  # noqa: F401
    HUB_VALIDATION_DIR,
    SCORES,
    adapter_names,
    base_model_name,
    hub_checkpoint_folder as checkpoint_folder,
    hub_validation_folder as validation_folder,
    hub_committed_steps,
    run_name as config_run_name,
)

Images = list[tuple[str, bytes]]  # (file name, PNG bytes)


@dataclass
class HubSettings:
    repo_id: str
    run_name: str
    base_model: str
    push_checkpoints: bool = True
    push_adapters: bool = True
    keep: int | None = 5  # None: every checkpoint (checkpoints_total_limit null)
    private: bool = True
    super_squash: bool = False
    squash_interval_s: float = 3600.0
    """Squash at most this often: each squash is a commit and rewrites the repo's history."""
    commits_per_window: int = 120
    window_s: float = 3600.0
    backoff_base_s: float = 2.0
    backoff_max_s: float = 300.0
    warn_every_s: float = 600.0
    """While failing, warn on the first failure, then at most this often."""
    total_steps: int = 0
    export_dtype: str = "fp32"
    """The root adapters' dtype: what Trainer.export writes (adapter_export_dtype), so the Hub's root files
    equal the exported ones; checkpoints stay fp32 (exact resume)."""
    summary: dict[str, str] = field(default_factory=dict)
    """The training config in a few lines, for the model card (never secrets)."""

    @property
    def adapter_names(self) -> tuple[str, str]:
        return adapter_names(self.run_name)

    @classmethod
    def from_config(cls, config: TrainConfig, run_name: str | None = None, **overrides) -> HubSettings | None:
        """None when the config pushes nothing to the Hub."""
        if not (config.push_to_hub or config.push_checkpoints_to_hub):
            return None
        import torch  # here, not at the top: the steward of a run without the Hub never loads torch

        from relay_train.trainer import export_dtype

        return cls(
            repo_id=config.hub_model_id,
            run_name=run_name or config_run_name(config),
            base_model=base_model_name(config.pretrained_model_name_or_path),
            export_dtype="bf16" if export_dtype(config) == torch.bfloat16 else "fp32",
            push_checkpoints=config.push_checkpoints_to_hub,
            push_adapters=config.push_to_hub,
            keep=ckpt.keep_count(config.checkpoints_total_limit),
            private=config.hub_private,
            super_squash=config.super_squash_history,
            total_steps=config.max_train_steps,
            summary=config_summary(config),
            **overrides,
        )


# -- what the repo holds ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HubView:
    """The repo as the mirror knows it: whole checkpoints (manifest present), validation steps, every file."""

    steps: frozenset[int] = frozenset()
    validation: frozenset[int] = frozenset()
    files: frozenset[str] = frozenset()

    @classmethod
    def from_files(cls, files: set[str] | frozenset[str]) -> HubView:
        """From a recursive listing of the repo's files. A checkpoint folder without its manifest is a
        torn upload from some other writer: it does not count, and the next plan replaces it."""
        steps = hub_committed_steps(files)
        validation = {int(m.group(1)) for p in files if (m := HUB_VALIDATION_DIR.match(p))}
        return cls(frozenset(steps), frozenset(validation), frozenset(files))

    def image_names(self, step: int) -> list[str]:
        prefix = validation_folder(step)
        return sorted(p for p in self.files if p.startswith(prefix) and not p.endswith(".json"))

    def scores_to_read(self, known: set[int]) -> list[int]:
        """Validation steps whose scores.json is on the Hub but not in memory (a restarted mirror)."""
        return sorted(s for s in self.validation - known if validation_folder(s) + SCORES in self.files)


# -- decisions ------------------------------------------------------------------------------------


def plan_checkpoints(on_hub: set[int], pending: set[int], keep: int | None) -> tuple[list[int], list[int]]:
    """(add, delete): the Hub should hold the newest `keep` of every step known (on the Hub or pending).
    A pending step older than those is skipped: uploading it would only delete it again."""
    desired = set(ckpt.keep_newest(list(on_hub | pending), keep)[0])
    return sorted(desired - on_hub), sorted(on_hub - desired)


@dataclass
class Round:
    """One commit's worth of work."""

    add: list[int]
    delete: list[int]
    root: int | None  # the step whose adapters go to the repo's root
    images: dict[int, Images]
    drop_validation: list[int]

    @property
    def fetch(self) -> list[int]:
        """Checkpoints whose files this commit reads from storage."""
        return sorted({*self.add, *([self.root] if self.root is not None else [])})

    def message(self) -> str:
        newest = max(self.fetch, default=None)
        message = f"checkpoint-{newest}" if newest is not None else "validation and model card"
        if self.delete:
            message += f"; prune {', '.join(f'checkpoint-{s}' for s in self.delete)}"
        return message

    def after(self, view: HubView, settings: HubSettings) -> HubView:
        """The repo once this commit lands (checkpoint folders are counted by their manifest)."""
        gone = tuple(checkpoint_folder(s) for s in self.delete) + tuple(validation_folder(s) for s in self.drop_validation)
        files = {p for p in view.files if not p.startswith(gone)}
        files |= {checkpoint_folder(s) + ckpt.MANIFEST for s in self.add}
        if self.root is not None:
            files.add(settings.adapter_names[0])
        for step, images in self.images.items():
            files |= {validation_folder(step) + name for name, _ in images} | {validation_folder(step) + SCORES}
        return HubView(
            frozenset((view.steps | set(self.add)) - set(self.delete)),
            frozenset((view.validation | set(self.images)) - set(self.drop_validation)),
            frozenset(files | {CARD}),
        )

    def card_step(self, view: HubView) -> int | None:
        """The step the card describes: the newest checkpoint held or pushed to the root after the commit."""
        after = (view.steps | set(self.add)) - set(self.delete)
        return max([*after, *([self.root] if self.root is not None else [])], default=None)

    def card_images(self, after: HubView) -> dict[int, list[str]]:
        """The images the card links, per validation step held after the commit, in upload order."""
        shown = {}
        for step in sorted(after.validation):
            names = (
                [validation_folder(step) + name for name, _ in self.images[step]]
                if step in self.images
                else after.image_names(step)
            )
            if names:
                shown[step] = names
        return shown


def plan_round(settings: HubSettings, view: HubView, pending: set[int], images: dict[int, Images]) -> Round | None:
    """The next commit: the newest `keep` checkpoints of the repo and pending together, the newest
    adapters at the root when a newer step is pending (or the root lacks them), new validation images
    and the pruning of old ones. None when the repo already matches (the pending steps are settled)."""
    s = settings
    add, delete = plan_checkpoints(set(view.steps), pending, s.keep) if s.push_checkpoints else ([], [])
    known = view.steps | pending
    root = None
    if s.push_adapters and known and max(known) in pending:
        newest = max(known)
        if newest > max(view.steps, default=-1) or s.adapter_names[0] not in view.files:
            root = newest
    keep_validation = set(ckpt.keep_newest(list(view.validation | set(images)), s.keep)[0])
    new_images = {step: imgs for step, imgs in images.items() if step in keep_validation}
    drop_validation = sorted(view.validation - keep_validation)
    if not (add or delete or root is not None or new_images or drop_validation):
        return None
    return Round(add, delete, root, new_images, drop_validation)


def newest_pending(steps: list[int] | set[int], keep: int | None) -> tuple[list[int], list[int]]:
    """(kept, dropped) among steps waiting for the Hub: only the newest `keep` can ever reach it."""
    return ckpt.keep_newest(list(steps), keep)


class CommitWindow:
    """At most `limit` commits in any `window_s` seconds (sliding window). The clock is passed in."""

    def __init__(self, limit: int, window_s: float, clock: Callable[[], float] = time.monotonic):
        if limit < 1:
            raise ValueError(f"the Hub commit limit must be at least 1 per window, got {limit}")
        self.limit, self.window_s, self.clock = limit, window_s, clock
        self.times: deque[float] = deque()

    def wait_s(self) -> float:
        """Seconds until one more commit fits (0 when it fits now)."""
        now = self.clock()
        while self.times and now - self.times[0] >= self.window_s:
            self.times.popleft()
        return 0.0 if len(self.times) < self.limit else self.times[0] + self.window_s - now

    def record(self) -> None:
        self.times.append(self.clock())
