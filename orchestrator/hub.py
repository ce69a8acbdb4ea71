"""The Hugging Face Hub mirror: every committed checkpoint goes to `hub_model_id` off the training path.

One background thread owns all Hub traffic. `submit(step)` only records the step and returns. The
thread makes ONE `create_commit` per round, holding everything due at that moment:
  - `checkpoints/checkpoint-N/` for the new steps, and folder deletions beyond the newest `keep`;
  - the newest adapter and EMA adapter at the root (named as `Trainer.export` names them);
  - validation images and scores under `validation/step-N/`, and the README.md model card.
When it falls behind (a slow or failing Hub, the rate limit) the pending steps coalesce into the
next commit; steps that fell out of the newest `keep` meanwhile are never uploaded. Commits stay under
a sliding-window rate limit (the Hub allows about 128 an hour). Any failure is retried with backoff
that honours Retry-After, reported through `warn` (the steward sends it to the webhook), and never
raised into the caller. The mirror holds no state that storage and the Hub cannot give back: a new
mirror lists the repo, compares it with storage's committed steps (`reconcile`) and converges.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import SecretStr

from orchestrator.policy import backoff, retry_after
from relay_train import checkpoint as ckpt
from relay_train.config import TrainConfig
from relay_train.trainer import run_name as config_run_name

log = logging.getLogger(__name__)

Fetch = Callable[[int, Path], Path]
"""fetch(step, dest_dir) -> a local, complete checkpoint folder (RunStorage.download_checkpoint)."""
Warn = Callable[[str], None]

CHECKPOINTS, VALIDATION, CARD = "checkpoints", "validation", "README.md"
_CHECKPOINT_DIR = re.compile(rf"^{CHECKPOINTS}/checkpoint-(\d+)/")
_VALIDATION_DIR = re.compile(rf"^{VALIDATION}/step-(\d+)/")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class HubMirrorError(RuntimeError):
    """A Hub round failed; the message is safe to show (no token)."""


# ----------------------------------------------------------------------------------------- policy


def plan_checkpoints(on_hub: set[int], pending: set[int], keep: int) -> tuple[list[int], list[int]]:
    """(add, delete): the Hub should hold the newest `keep` of every step known (on the Hub or pending).
    A pending step older than those is skipped: uploading it would only delete it again."""
    desired = set(sorted(on_hub | pending)[-keep:])
    return sorted(desired - on_hub), sorted(on_hub - desired)


def retry_delay(failures: int, base_s: float, cap_s: float, retry_after: float | None) -> float:
    """Exponential backoff (policy.backoff); a server's Retry-After wins, bounded by the cap."""
    if retry_after is not None:
        return min(max(retry_after, 0.0), cap_s)
    return backoff(failures, base_s, cap_s)


class CommitWindow:
    """At most `limit` commits in any `window_s` seconds (sliding window)."""

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


# ----------------------------------------------------------------------------------------- settings


@dataclass
class HubSettings:
    repo_id: str
    run_name: str
    base_model: str
    push_checkpoints: bool = True
    push_adapters: bool = True
    keep: int = 5
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
    summary: dict[str, str] = field(default_factory=dict)
    """The training config in a few lines, for the model card (never secrets)."""

    @property
    def adapter_names(self) -> tuple[str, str]:
        base = f"sd35-{self.run_name}-lokr"
        return f"{base}.safetensors", f"{base}-ema.safetensors"

    @classmethod
    def from_config(cls, config: TrainConfig, run_name: str | None = None, **overrides) -> HubSettings | None:
        """None when the config pushes nothing to the Hub."""
        if not (config.push_to_hub or config.push_checkpoints_to_hub):
            return None
        return cls(repo_id=config.hub_model_id, run_name=run_name or config_run_name(config),
                   base_model=config.pretrained_model_name_or_path,
                   push_checkpoints=config.push_checkpoints_to_hub, push_adapters=config.push_to_hub,
                   keep=ckpt.keep_count(config.checkpoints_total_limit), private=config.hub_private,
                   super_squash=config.super_squash_history, total_steps=config.max_train_steps,
                   summary=config_summary(config), **overrides)


def config_summary(config: TrainConfig) -> dict[str, str]:
    """What a reader of the card needs to reproduce the run; a fixed list of keys, so no secret leaks."""
    rows = {
        "base model": config.pretrained_model_name_or_path,
        "base precision": config.base_model_precision,
        "adapter": f"LyCORIS {config.lycoris.algo}" if config.lycoris else config.lora_type,
        "optimizer": f"{config.optimizer}, lr {config.learning_rate:g}, {config.lr_scheduler} "
                     f"(warmup {config.lr_warmup_steps})",
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
        rows["adapter"] += (f" (factor {lyco.factor}, linear_dim {lyco.linear_dim}, "
                            f"linear_alpha {lyco.linear_alpha:g})")
    return rows


class StorageFetch:
    """fetch for a RunStorage: download and verify checkpoint-<step> (picklable, for actors)."""

    def __init__(self, storage):
        self.storage = storage

    def __call__(self, step: int, dest: Path) -> Path:
        return self.storage.download_checkpoint(step, dest)


# ----------------------------------------------------------------------------------------- the mirror


@dataclass
class _Pending:
    fetch: Fetch
    final: bool = False


@dataclass
class _Round:
    """One commit's worth of work, planned from a snapshot of the mirror's state."""

    add: list[int]
    delete: list[int]
    root: int | None
    images: dict[int, list[tuple[str, bytes]]]
    drop_validation: list[int]


class HubMirror:
    """Mirrors committed checkpoints to the Hub from a background thread. Every public method returns
    at once and never raises for a Hub problem. See the module docstring for what a commit holds."""

    def __init__(self, settings: HubSettings, *, fetch: Fetch | None = None, warn: Warn | None = None,
                 token: str | None = None, endpoint: str | None = None, work_dir: Path | None = None,
                 list_storage: Callable[[], list[int]] | None = None,
                 on_pushed: Callable[[dict], None] | None = None):
        """`on_pushed(info)` hears of each commit that landed: {"added", "deleted", "root", "hub_steps"}."""
        from huggingface_hub import HfApi, get_token
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()  # a background service: its bars would only garble the driver's log
        self.settings = settings
        self._fetch, self._warn_cb, self._list_storage = fetch, warn, list_storage
        self._pushed_cb = on_pushed
        secret = token or get_token()  # HF_TOKEN, else the token `hf auth login` stored
        self._token = SecretStr(secret) if secret else None
        # HF_ENDPOINT is read now, not at import: the client freezes it when first imported.
        self._api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None)
        self._own_work_dir = work_dir is None
        self._work = Path(work_dir or tempfile.mkdtemp(prefix="relay-hub-"))
        self._window = CommitWindow(settings.commits_per_window, settings.window_s)
        self._cond = threading.Condition()
        self._pending: dict[int, _Pending] = {}
        self._images: dict[int, list[tuple[str, bytes]]] = {}  # validation images not on the Hub yet
        self._scores: dict[int, dict] = {}
        self._fetched: dict[int, Path] = {}
        self._hub: set[int] | None = None  # checkpoint steps on the Hub; None until listed
        self._hub_validation: set[int] = set()
        self._hub_files: set[str] = set()
        self._repo_ready = self._stop = self._closing = self._squash_due = False
        self._reconcile_wanted = False
        self._final_step: int | None = None
        self._next_attempt = 0.0
        self._failures = self._commits = self._squashes = self._skipped = 0
        self._last_error: str | None = None
        self._last_warned = -1e18
        self._last_squash = -1e18
        if self._token is None:
            self._warn("no Hugging Face token (set HF_TOKEN or run `hf auth login`): Hub pushes will be refused")
        self._thread = threading.Thread(target=self._run, name="relay-hub-mirror", daemon=True)
        self._thread.start()

    @classmethod
    def for_run(cls, config: TrainConfig, storage, *, warn: Warn | None = None, run_name: str | None = None,
                **kwargs) -> HubMirror | None:
        """The mirror a run's steward drives (None when the config pushes nothing); it reconciles with
        storage at once, in its own thread."""
        settings = HubSettings.from_config(config, run_name or storage.run_name)
        if settings is None:
            return None
        mirror = cls(settings, fetch=StorageFetch(storage), warn=warn, list_storage=storage.checkpoint_steps, **kwargs)
        mirror.reconcile()
        return mirror

    # -- the caller's side (all non-blocking) -------------------------------------------------------------
    def submit(self, step: int, fetch: Fetch | None = None, *, final: bool = False) -> None:
        """checkpoint-<step> is committed in storage: mirror it. Returns at once."""
        with self._cond:
            fetch = fetch or self._fetch
            if fetch is None:
                raise ValueError("HubMirror.submit needs a fetch (none was given to the mirror)")
            self._pending[step] = _Pending(fetch, final or self._pending.get(step, _Pending(fetch)).final)
            if final:
                self._final_step = step
            # Bounded: only the newest `keep` pending steps can ever reach the Hub.
            for old in sorted(self._pending)[:-self.settings.keep]:
                del self._pending[old]
                self._skipped += 1
            self._cond.notify_all()

    def final(self, step: int, fetch: Fetch | None = None) -> None:
        """Training finished at `step`: push it (the card says so). close() waits for it."""
        self.submit(step, fetch, final=True)

    def note_validation(self, step: int, images: list[tuple[str, bytes]], scores: dict) -> None:
        """Validation at `step`: images (file name, PNG bytes) go under validation/step-<step>/ in the next
        commit, and the card shows them with the scores."""
        with self._cond:
            self._images[step] = list(images)
            self._scores[step] = dict(scores)
            for old in sorted(self._images)[:-self.settings.keep]:
                del self._images[old]
            self._cond.notify_all()

    def reconcile(self, storage_steps: list[int] | None = None, fetch: Fetch | None = None) -> None:
        """Compare the Hub with storage's committed steps (listed by the worker when None): push what is
        missing among the newest `keep`, prune what exceeds it, in one commit."""
        if storage_steps is None and self._list_storage is None:
            raise ValueError("HubMirror.reconcile needs storage_steps (the mirror was given no list_storage)")
        with self._cond:
            self._fetch = fetch or self._fetch
            self._hub = None  # list the Hub again first
            if storage_steps is None:
                self._reconcile_wanted = True
            else:
                self._queue_storage_steps(storage_steps)
            self._cond.notify_all()

    def on_event(self, event: dict) -> None:
        """Steward service hook: a committed checkpoint is submitted; completion is the final push."""
        if event.get("type") == "checkpoint" and "step" in event:
            self.submit(event["step"])
        elif event.get("type") == "completed" and event.get("step") is not None:
            self.final(event["step"])

    def status(self) -> dict:
        with self._cond:
            return {"repo_id": self.settings.repo_id, "hub_steps": sorted(self._hub or []),
                    "pending": sorted(self._pending), "validation_pending": sorted(self._images),
                    "commits": self._commits, "squashes": self._squashes, "skipped": self._skipped,
                    "failures_in_a_row": self._failures, "last_error": self._last_error,
                    "final_step": self._final_step, "running": self._thread.is_alive()}

    def flush(self, timeout: float) -> bool:
        """Wait up to `timeout` s for everything submitted to reach the Hub; True when it did."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._has_work() and not self._stop:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
            return not self._has_work()

    def close(self, timeout: float = 60.0) -> bool:
        """Flush what fits in `timeout`, then stop the thread. True when nothing was left behind."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._closing = True
        flushed = self.flush(timeout)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        # A client call already in flight cannot be interrupted; the thread is a daemon and exits after it.
        self._thread.join(max(deadline - time.monotonic(), 0.1))
        if not flushed:
            self._warn(f"Hub mirror closed with work left: pending checkpoints {sorted(self._pending)}; "
                       "the next run's mirror reconciles them from storage")
        if self._own_work_dir and not self._thread.is_alive():
            shutil.rmtree(self._work, ignore_errors=True)
        return flushed

    # -- the worker ---------------------------------------------------------------------------------------
    def _has_work(self) -> bool:
        return bool(self._pending or self._images or self._reconcile_wanted or self._hub is None)

    def _wait_s(self) -> float | None:
        """None when due now; else how long to sleep (bounded so close() is seen)."""
        if not self._has_work():
            return 5.0
        wait = max(self._next_attempt - time.monotonic(), self._window.wait_s())
        return None if wait <= 0 else min(wait, 5.0)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and (wait := self._wait_s()) is not None:
                    self._cond.wait(wait)
                if self._stop:
                    return
            try:
                self._round()
                with self._cond:
                    if self._failures:
                        log.info("Hub mirror recovered after %d failed attempt(s)", self._failures)
                    self._failures, self._last_error = 0, None
            except Exception as exc:  # noqa: BLE001 - every failure is retried; none reaches training
                self._failed(exc)
            with self._cond:
                self._cond.notify_all()

    def _failed(self, exc: Exception) -> None:
        retry_after = _retry_after(exc)
        with self._cond:
            self._failures += 1
            self._hub = None  # the commit may have landed with its answer lost: list again before retrying
            delay = retry_delay(self._failures, self.settings.backoff_base_s, self.settings.backoff_max_s, retry_after)
            self._next_attempt = time.monotonic() + delay
            self._last_error = self._scrub(f"{type(exc).__name__}: {exc}")
            failures, now = self._failures, time.monotonic()
            should_warn = failures == 1 or now - self._last_warned >= self.settings.warn_every_s
            if should_warn:
                self._last_warned = now
        message = (f"Hub mirror to {self.settings.repo_id} failed ({failures} in a row; training is not affected, "
                   f"retrying in {delay:.1f}s): {self._last_error.splitlines()[0][:300]}")
        log.warning("%s", message)
        if should_warn:
            self._warn(message)

    def _round(self) -> None:
        """List the Hub if needed, plan, fetch, and make at most one commit (plus an optional squash)."""
        token = self._token.get_secret_value() if self._token else None
        if not self._repo_ready:
            self._api.create_repo(self.settings.repo_id, private=self.settings.private, exist_ok=True, token=token)
            self._repo_ready = True
        if self._reconcile_wanted and self._list_storage is not None:
            steps = self._list_storage()
            with self._cond:
                self._queue_storage_steps(steps)
                self._reconcile_wanted = False
        if self._hub is None:
            self._list_hub(token)
        with self._cond:
            plan = self._plan()
            pending = dict(self._pending)
        if plan is None:
            return
        folders = self._fetch_folders(plan, pending)
        if folders is None:
            return  # a step vanished from storage; replanned next round
        operations = self._operations(plan, folders)
        newest = max([*plan.add, *( [plan.root] if plan.root is not None else [])], default=None)
        message = f"checkpoint-{newest}" if newest is not None else "validation and model card"
        if plan.delete:
            message += f"; prune {', '.join(f'checkpoint-{s}' for s in plan.delete)}"
        with self._cond:
            self._window.record()  # counted even if it fails: the Hub may have counted it too
        self._api.create_commit(self.settings.repo_id, operations, commit_message=message, token=token)
        self._committed(plan, pending)
        if self._squash_due:
            self._squash(token)

    def _queue_storage_steps(self, steps: list[int]) -> None:
        fetch = self._fetch
        if fetch is None:
            raise ValueError("HubMirror.reconcile needs a fetch (none was given to the mirror)")
        for step in sorted(steps)[-self.settings.keep:]:
            self._pending.setdefault(step, _Pending(fetch))

    def _list_hub(self, token: str | None) -> None:
        files = {f.path for f in self._api.list_repo_tree(self.settings.repo_id, recursive=True, token=token)
                 if not hasattr(f, "tree_id")}
        steps = {int(m.group(1)) for p in files if (m := _CHECKPOINT_DIR.match(p)) and p.endswith("/" + ckpt.MANIFEST)}
        validation = {int(m.group(1)) for p in files if (m := _VALIDATION_DIR.match(p))}
        scores = {}
        for step in validation - set(self._scores):
            name = f"{VALIDATION}/step-{step}/scores.json"
            if name in files:  # give a restarted mirror the scores it showed before
                path = self._api.hf_hub_download(self.settings.repo_id, name, local_dir=self._work / "scores", token=token)
                scores[step] = json.loads(Path(path).read_text())
        with self._cond:
            self._hub, self._hub_files, self._hub_validation = steps, files, validation
            self._scores = {**scores, **self._scores}

    def _plan(self) -> _Round | None:
        """What the next commit holds, or None when the Hub already matches (pending steps then clear)."""
        s, hub = self.settings, self._hub or set()
        add, delete = plan_checkpoints(hub, set(self._pending), s.keep) if s.push_checkpoints else ([], [])
        known = hub | set(self._pending)
        root = None
        if s.push_adapters and known and max(known) in self._pending:
            newest = max(known)
            if newest > max(hub, default=-1) or s.adapter_names[0] not in self._hub_files:
                root = newest
        keep_validation = set(sorted(self._hub_validation | set(self._images))[-s.keep:])
        images = {step: imgs for step, imgs in self._images.items() if step in keep_validation}
        drop_validation = sorted(self._hub_validation - keep_validation)
        if not (add or delete or root is not None or images or drop_validation):
            self._skipped += len([p for p in self._pending if p not in hub and p not in add])
            self._pending.clear()
            self._images.clear()
            return None
        return _Round(add, delete, root, images, drop_validation)

    def _fetch_folders(self, plan: _Round, pending: dict[int, _Pending]) -> dict[int, Path] | None:
        folders = {}
        for step in sorted({*plan.add, *([plan.root] if plan.root is not None else [])}):
            folder = self._fetched.get(step)
            if folder is None or not (folder / ckpt.MANIFEST).is_file():
                try:
                    folder = pending[step].fetch(step, self._work / "checkpoints")
                except (ckpt.CheckpointError, FileNotFoundError) as exc:
                    self._warn(f"Hub mirror skips checkpoint-{step}: it is no longer in storage ({exc})")
                    with self._cond:
                        self._pending.pop(step, None)
                        self._skipped += 1
                    return None
                self._fetched[step] = folder
            folders[step] = folder
        return folders

    def _operations(self, plan: _Round, folders: dict[int, Path]) -> list:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        ops: list = []
        for step in plan.add:
            for file in sorted(p for p in folders[step].rglob("*") if p.is_file()):
                rel = file.relative_to(folders[step]).as_posix()
                ops.append(CommitOperationAdd(f"{CHECKPOINTS}/checkpoint-{step}/{rel}", str(file)))
        ops += [CommitOperationDelete(f"{CHECKPOINTS}/checkpoint-{step}/", is_folder=True) for step in plan.delete]
        if plan.root is not None:
            for name, target in zip((ckpt.ADAPTER, ckpt.ADAPTER_EMA), self.settings.adapter_names):
                if (folders[plan.root] / name).is_file():
                    ops.append(CommitOperationAdd(target, str(folders[plan.root] / name)))
        for step, images in plan.images.items():
            ops += [CommitOperationAdd(f"{VALIDATION}/step-{step}/{name}", data) for name, data in images]
            ops.append(CommitOperationAdd(f"{VALIDATION}/step-{step}/scores.json",
                                          json.dumps(self._scores.get(step, {}), sort_keys=True).encode()))
        ops += [CommitOperationDelete(f"{VALIDATION}/step-{step}/", is_folder=True) for step in plan.drop_validation]
        hub_after = ((self._hub or set()) | set(plan.add)) - set(plan.delete)
        card_step = max([*hub_after, *([plan.root] if plan.root is not None else [])], default=None)
        validation_after = (self._hub_validation | set(plan.images)) - set(plan.drop_validation)
        with self._cond:
            final = self._final_step is not None and card_step == self._final_step
            images_after = {s: names for s in validation_after if (names := self._image_names(s, plan))}
            scores = {s: self._scores[s] for s in validation_after if s in self._scores}
        card = model_card(self.settings, step=card_step, final=final, checkpoints=sorted(hub_after),
                          images=images_after, scores=scores)
        ops.append(CommitOperationAdd(CARD, card.encode()))
        return ops

    def _image_names(self, step: int, plan: _Round) -> list[str]:
        if step in plan.images:
            return [f"{VALIDATION}/step-{step}/{name}" for name, _ in plan.images[step]]
        prefix = f"{VALIDATION}/step-{step}/"
        return sorted(p for p in self._hub_files if p.startswith(prefix) and not p.endswith(".json"))

    def _committed(self, plan: _Round, pending: dict[int, _Pending]) -> None:
        with self._cond:
            self._commits += 1
            hub = ((self._hub or set()) | set(plan.add)) - set(plan.delete)
            self._hub = hub
            # Every step in the snapshot is settled: uploaded, already there, or coalesced away.
            for step, entry in pending.items():
                if self._pending.get(step) is entry:  # not submitted again meanwhile
                    del self._pending[step]
                    self._skipped += step not in hub and step != plan.root
            for step in plan.delete:
                self._hub_files = {p for p in self._hub_files if not p.startswith(f"{CHECKPOINTS}/checkpoint-{step}/")}
            if plan.root is not None:
                self._hub_files |= set(self.settings.adapter_names[:1])
            for step in plan.images:
                self._hub_files |= set(self._image_names(step, plan))
                if self._images.get(step) is plan.images[step]:
                    del self._images[step]
            self._hub_validation = (self._hub_validation | set(plan.images)) - set(plan.drop_validation)
            self._squash_due = self._squash_due or (self.settings.super_squash and bool(plan.delete))
        for step in [s for s in self._fetched if s not in self._pending]:
            shutil.rmtree(self._fetched.pop(step), ignore_errors=True)
        log.info("Hub mirror: %s now holds checkpoints %s", self.settings.repo_id, sorted(hub))
        if self._pushed_cb is not None:
            try:
                self._pushed_cb({"added": sorted(plan.add), "deleted": sorted(plan.delete), "root": plan.root,
                                 "hub_steps": sorted(hub)})
            except Exception:  # noqa: BLE001 - the listener's trouble is not the mirror's
                log.exception("Hub mirror: the on_pushed callback failed")

    def _squash(self, token: str | None) -> None:
        """super_squash_history after a prune, at most every squash_interval_s: frees deleted files' space."""
        now = time.monotonic()
        if now - self._last_squash < self.settings.squash_interval_s or self._window.wait_s() > 0:
            return
        with self._cond:
            self._window.record()
        try:
            self._api.super_squash_history(self.settings.repo_id, token=token,
                                           commit_message=f"Squash history (relay, {self.settings.run_name})")
        except Exception as exc:  # noqa: BLE001 - the squash is housekeeping: warn and try after the next prune
            self._warn(self._scrub(f"Hub mirror: super_squash_history on {self.settings.repo_id} failed: {exc}"))
            return
        self._last_squash, self._squash_due = now, False
        self._squashes += 1

    # -- helpers ------------------------------------------------------------------------------------------
    def _scrub(self, text: str) -> str:
        if self._token is not None:
            text = text.replace(self._token.get_secret_value(), "***")
        return text

    def _warn(self, message: str) -> None:
        message = self._scrub(message)
        if self._warn_cb is None:
            log.warning("%s", message)
            return
        try:
            self._warn_cb(message)
        except Exception:  # noqa: BLE001 - a broken webhook must not stop the mirror
            log.exception("Hub mirror: the warn callback failed")


def _retry_after(exc: Exception) -> float | None:
    """Retry-After (seconds) from an HTTP error the client raised, when the server sent one."""
    response = getattr(exc, "response", None)
    return retry_after(getattr(response, "headers", None)) if response is not None else None


# ----------------------------------------------------------------------------------------- model card


def model_card(settings: HubSettings, *, step: int | None, final: bool, checkpoints: list[int],
               images: dict[int, list[str]], scores: dict[int, dict]) -> str:
    """README.md: what the adapter is, how it was trained, how it validates, how to load it.
    Deterministic for the same inputs, so an unchanged card is never a new commit."""
    s = settings
    adapter, ema = s.adapter_names
    front = ["---", "library_name: lycoris", "pipeline_tag: text-to-image",
             "tags:", "- lycoris", "- lokr", "- stable-diffusion-3", "- text-to-image"]
    if _HUB_ID.match(s.base_model) and not Path(s.base_model).exists():
        front.append(f"base_model: {s.base_model}")  # the Hub rejects a local path here
    front.append("---")
    progress = "unknown" if step is None else (f"{step}" + (f" of {s.total_steps}" if s.total_steps else ""))
    state = "final" if final else "training in progress"
    lines = [*front, "", f"# {s.run_name}: LyCORIS LoKr adapter for {s.base_model}", "",
             f"Trained with Terminus Relay. Step {progress} ({state}).", "", "## Files", "",
             "| file | what it is |", "|---|---|"]
    if s.push_adapters:
        lines += [f"| `{ema}` | the EMA of the adapter weights (recommended; present when EMA is on) |",
                  f"| `{adapter}` | the adapter weights at step {step} |"]
    if s.push_checkpoints:
        names = ", ".join(f"`checkpoint-{c}`" for c in checkpoints) or "none yet"
        lines.append(f"| `{CHECKPOINTS}/` | the newest {s.keep} resumable checkpoints: {names} |")
    lines += ["", "## Training config", "", "| setting | value |", "|---|---|",
              *(f"| {k} | {v} |" for k, v in s.summary.items())]
    if images or scores:
        lines += ["", "## Validation", ""]
        keys = sorted({k for row in scores.values() for k in row})
        if keys:
            lines += ["| step | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
            lines += [f"| {st} | " + " | ".join(_fmt(scores[st].get(k)) for k in keys) + " |" for st in sorted(scores)]
            lines.append("")
        latest = max(images, default=None)
        if latest is not None:
            lines += [f"Images at step {latest}:", "",
                      *(f"![{Path(p).stem}]({p})" for p in images[latest])]
    lines += ["", "## How to load", "", "```python", "import torch",
              "from diffusers import StableDiffusion3Pipeline", "from huggingface_hub import hf_hub_download",
              "from lycoris import create_lycoris_from_weights", "",
              f'pipe = StableDiffusion3Pipeline.from_pretrained("{s.base_model}", torch_dtype=torch.bfloat16)',
              f'path = hf_hub_download("{s.repo_id}", "{ema if s.push_adapters else adapter}")',
              "wrapper, _ = create_lycoris_from_weights(1.0, path, pipe.transformer)",
              "wrapper.merge_to()  # or wrapper.apply_to() to keep it separate",
              'pipe.to("cuda")', "```", ""]
    return "\n".join(lines)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else ("" if value is None else str(value))
