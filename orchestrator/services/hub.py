"""The Hugging Face Hub mirror: every committed checkpoint goes to `hub_model_id` off the training path.

Three parts: the planner (orchestrator/hub_plan.py) decides what one commit holds from the repo's view
and what is pending; the card (orchestrator/hub_card.py) is a `ModelCard`; this module carries the
plan out through an `HfApi` it is given (the real client, pointed at the Hub or at a loopback one).

`start()` starts one background thread that owns all Hub traffic; `submit(step)` only records the step
and returns. The thread makes ONE `create_commit` per round, holding everything due at that moment:
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
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from orchestrator.services.hub_card import model_card
from orchestrator.services.hub_plan import (
    CARD,
    CHECKPOINTS,
    SCORES,
    VALIDATION,
    CommitWindow,
    HubSettings,
    HubView,
    Images,
    Round,
    checkpoint_folder,
    newest_pending,
    plan_checkpoints,
    plan_round,
    validation_folder,
)
from orchestrator.core.ledger import EventType
from orchestrator.core.failure import HttpFailure, Retries, decide
from orchestrator.core.policy import retry_after
from relay_train import checkpoint as ckpt
from relay_train.artifacts import is_committed
from relay_train.config import TrainConfig

__all__ = [
    "CARD",
    "CHECKPOINTS",
    "VALIDATION",
    "CommitWindow",
    "HubMirror",
    "HubMirrorError",
    "HubSettings",
    "StorageFetch",
    "model_card",
    "plan_checkpoints",
    "plan_round",
]

log = logging.getLogger(__name__)

Fetch = Callable[[int, Path], Path]
"""fetch(step, dest_dir) -> a local, complete checkpoint folder (RunStorage.download_checkpoint)."""
Warn = Callable[[str], None]


class HubMirrorError(RuntimeError):
    """A Hub round failed; the message is safe to show (no token)."""


class StorageFetch:
    """fetch for a RunStorage: download and verify checkpoint-<step> (picklable, for actors)."""

    def __init__(self, storage):
        self.storage = storage

    def __call__(self, step: int, dest: Path) -> Path:
        return self.storage.download_checkpoint(step, dest)


@dataclass
class _Pending:
    fetch: Fetch
    final: bool = False


class HubMirror:
    """Mirrors committed checkpoints to the Hub from a background thread, once `start()`ed. Every public
    method returns at once and never raises for a Hub problem. See the module docstring."""

    def __init__(
        self,
        settings: HubSettings,
        *,
        api=None,
        fetch: Fetch | None = None,
        warn: Warn | None = None,
        token: str | None = None,
        endpoint: str | None = None,
        work_dir: Path | None = None,
        list_storage: Callable[[], list[int]] | None = None,
        on_pushed: Callable[[dict], None] | None = None,
    ):
        """`api`: a `huggingface_hub.HfApi` (default: one for `endpoint`, else HF_ENDPOINT, else the Hub).
        `on_pushed(info)` hears of each commit that landed: {"added", "deleted", "root", "hub_steps"}."""
        from huggingface_hub import HfApi, get_token
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()  # a background service: its bars would only garble the driver's log
        self.settings = settings
        self._fetch, self._warn_cb, self._list_storage = fetch, warn, list_storage
        self._pushed_cb = on_pushed
        secret = token or get_token()  # HF_TOKEN, else the token `hf auth login` stored
        self._token = SecretStr(secret) if secret else None
        # HF_ENDPOINT is read now, not at import: the client freezes it when first imported.
        self._api = api if api is not None else HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None)
        self._own_work_dir = work_dir is None
        self._work_dir = work_dir
        self._work: Path | None = None
        self._window = CommitWindow(settings.commits_per_window, settings.window_s)
        self._cond = threading.Condition()
        self._pending: dict[int, _Pending] = {}
        self._images: dict[int, Images] = {}  # validation images not on the Hub yet
        self._scores: dict[int, dict] = {}
        self._fetched: dict[int, Path] = {}
        self._view: HubView | None = None  # what the repo holds; None until listed
        self._repo_ready = self._stop = self._squash_due = False
        self._reconcile_wanted = False
        self._final_step: int | None = None
        self._next_attempt = 0.0
        self._failures = self._commits = self._squashes = self._skipped = 0
        self._last_error: str | None = None
        self._last_warned = -1e18
        self._last_squash = -1e18
        self._thread: threading.Thread | None = None

    @classmethod
    def for_run(
        cls, config: TrainConfig, storage, *, warn: Warn | None = None, run_name: str | None = None, **kwargs
    ) -> HubMirror | None:
        """The mirror a run's steward drives (None when the config pushes nothing); once started it
        reconciles with storage first, in its own thread."""
        settings = HubSettings.from_config(config, run_name or storage.run_name)
        if settings is None:
            return None
        mirror = cls(settings, fetch=StorageFetch(storage), warn=warn, list_storage=storage.checkpoint_steps, **kwargs)
        mirror.reconcile()
        return mirror

    def start(self) -> HubMirror:
        """Start the thread that talks to the Hub (once; later calls do nothing)."""
        with self._cond:
            if self._thread is not None:
                return self
            self._work = Path(self._work_dir or tempfile.mkdtemp(prefix="relay-hub-"))
            self._thread = threading.Thread(target=self._run, name="relay-hub-mirror", daemon=True)
        if self._token is None:
            self._warn("no Hugging Face token (set HF_TOKEN or run `hf auth login`): Hub pushes will be refused")
        self._thread.start()
        return self

    def __enter__(self) -> HubMirror:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

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
            for old in newest_pending(set(self._pending), self.settings.keep)[1]:
                del self._pending[old]
                self._skipped += 1
            self._cond.notify_all()

    def final(self, step: int, fetch: Fetch | None = None) -> None:
        """Training finished at `step`: push it (the card says so). close() waits for it."""
        self.submit(step, fetch, final=True)

    def note_validation(self, step: int, images: Images, scores: dict) -> None:
        """Validation at `step`: images (file name, PNG bytes) go under validation/step-<step>/ in the next
        commit, and the card shows them with the scores."""
        with self._cond:
            self._images[step] = list(images)
            self._scores[step] = dict(scores)
            for old in newest_pending(set(self._images), self.settings.keep)[1]:
                del self._images[old]
            self._cond.notify_all()

    def reconcile(self, storage_steps: list[int] | None = None, fetch: Fetch | None = None) -> None:
        """Compare the Hub with storage's committed steps (listed by the worker when None): push what is
        missing among the newest `keep`, prune what exceeds it, in one commit."""
        if storage_steps is None and self._list_storage is None:
            raise ValueError("HubMirror.reconcile needs storage_steps (the mirror was given no list_storage)")
        with self._cond:
            self._fetch = fetch or self._fetch
            self._view = None  # list the Hub again first
            if storage_steps is None:
                self._reconcile_wanted = True
            else:
                self._queue_storage_steps(storage_steps)
            self._cond.notify_all()

    def on_event(self, event: dict) -> None:
        """Steward service hook: a committed checkpoint is submitted; completion is the final push."""
        if event.get("type") == EventType.CHECKPOINT and "step" in event:
            self.submit(event["step"])
        elif event.get("type") == EventType.COMPLETED and event.get("step") is not None:
            self.final(event["step"])

    def status(self) -> dict:
        with self._cond:
            return {
                "repo_id": self.settings.repo_id,
                "hub_steps": sorted(self._view.steps if self._view else []),
                "pending": sorted(self._pending),
                "validation_pending": sorted(self._images),
                "commits": self._commits,
                "squashes": self._squashes,
                "skipped": self._skipped,
                "failures_in_a_row": self._failures,
                "last_error": self._last_error,
                "final_step": self._final_step,
                "running": self._thread is not None and self._thread.is_alive(),
            }

    def flush(self, timeout: float) -> bool:
        """Wait up to `timeout` s for everything submitted to reach the Hub; True when it did."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._has_work() and not self._stop and self._thread is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
            return not self._has_work()

    def close(self, timeout: float = 60.0) -> bool:
        """Flush what fits in `timeout`, then stop the thread. True when nothing was left behind."""
        deadline = time.monotonic() + timeout
        flushed = self.flush(timeout)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            # A client call already in flight cannot be interrupted; the thread is a daemon and exits after it.
            self._thread.join(max(deadline - time.monotonic(), 0.1))
        if not flushed:
            self._warn(
                f"Hub mirror closed with work left: pending checkpoints {sorted(self._pending)}; "
                "the next run's mirror reconciles them from storage"
            )
        alive = self._thread is not None and self._thread.is_alive()
        if self._own_work_dir and self._work is not None and not alive:
            shutil.rmtree(self._work, ignore_errors=True)
        return flushed

    # -- the worker ---------------------------------------------------------------------------------------
    def _has_work(self) -> bool:
        return bool(self._pending or self._images or self._reconcile_wanted or self._view is None)

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
        response = getattr(exc, "response", None)
        wait = retry_after(getattr(response, "headers", None)) if response is not None else None
        with self._cond:
            self._failures += 1
            self._view = None  # the commit may have landed with its answer lost: list again before retrying
            cap = self.settings.backoff_max_s  # a huge Retry-After is bounded too: close stays responsive
            # every failure is retried (status None), as failure.decide says for an HTTP failure
            retries = Retries(base=self.settings.backoff_base_s, cap=cap, longest_wait=cap)
            delay = decide(HttpFailure(None, wait), self._failures, retries).delay
            self._next_attempt = time.monotonic() + delay
            self._last_error = self._scrub(f"{type(exc).__name__}: {exc}")
            failures, now = self._failures, time.monotonic()
            should_warn = failures == 1 or now - self._last_warned >= self.settings.warn_every_s
            if should_warn:
                self._last_warned = now
        message = (
            f"Hub mirror to {self.settings.repo_id} failed ({failures} in a row; training is not affected, "
            f"retrying in {delay:.1f}s): {self._last_error.splitlines()[0][:300]}"
        )
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
        if self._view is None:
            self._list_hub(token)
        with self._cond:
            view, pending = self._view, dict(self._pending)
            if view is None:  # a reconcile asked for a fresh listing meanwhile
                return
            plan = plan_round(self.settings, view, set(pending), dict(self._images))
            if plan is None:  # the Hub already matches: every pending step is settled
                self._skipped += len([p for p in pending if p not in view.steps])
                self._pending.clear()
                self._images.clear()
                return
        folders = self._fetch_folders(plan, pending)
        if folders is None:
            return  # a step vanished from storage; replanned next round
        operations = self._operations(plan, view, folders)
        try:
            self._api.create_commit(self.settings.repo_id, operations, commit_message=plan.message(), token=token)
        finally:  # counted when it ends, as the Hub counts it (uploads come first), and even if it failed
            with self._cond:
                self._window.record()
        self._committed(plan, view, pending)
        if self._squash_due:
            self._squash(token)

    def _queue_storage_steps(self, steps: list[int]) -> None:
        fetch = self._fetch
        if fetch is None:
            raise ValueError("HubMirror.reconcile needs a fetch (none was given to the mirror)")
        for step in newest_pending(steps, self.settings.keep)[0]:
            self._pending.setdefault(step, _Pending(fetch))

    def _list_hub(self, token: str | None) -> None:
        files = {
            f.path
            for f in self._api.list_repo_tree(self.settings.repo_id, recursive=True, token=token)
            if not hasattr(f, "tree_id")
        }
        view = HubView.from_files(files)
        scores = {}
        for step in view.scores_to_read(set(self._scores)):  # give a restarted mirror the scores it showed
            path = self._api.hf_hub_download(
                self.settings.repo_id, validation_folder(step) + SCORES, local_dir=self._work / "scores", token=token
            )
            scores[step] = json.loads(Path(path).read_text())
        with self._cond:
            self._view = view
            self._scores = {**scores, **self._scores}

    def _fetch_folders(self, plan: Round, pending: dict[int, _Pending]) -> dict[int, Path] | None:
        folders = {}
        for step in plan.fetch:
            folder = self._fetched.get(step)
            if folder is None or not is_committed(lambda path: Path(path).is_file(), str(folder)):
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

    def _operations(self, plan: Round, view: HubView, folders: dict[int, Path]) -> list:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        ops: list = []
        for step in plan.add:
            for file in sorted(p for p in folders[step].rglob("*") if p.is_file()):
                ops.append(CommitOperationAdd(checkpoint_folder(step) + file.relative_to(folders[step]).as_posix(), str(file)))
        ops += [CommitOperationDelete(checkpoint_folder(step), is_folder=True) for step in plan.delete]
        if plan.root is not None:
            for name, target in zip((ckpt.ADAPTER, ckpt.ADAPTER_EMA), self.settings.adapter_names):
                if (folders[plan.root] / name).is_file():
                    ops.append(CommitOperationAdd(target, as_export(folders[plan.root] / name, self.settings.export_dtype)))
        with self._cond:
            scores = dict(self._scores)
            final_step = self._final_step
        for step, images in plan.images.items():
            ops += [CommitOperationAdd(validation_folder(step) + name, data) for name, data in images]
            ops.append(
                CommitOperationAdd(validation_folder(step) + SCORES, json.dumps(scores.get(step, {}), sort_keys=True).encode())
            )
        ops += [CommitOperationDelete(validation_folder(step), is_folder=True) for step in plan.drop_validation]
        after, card_step = plan.after(view, self.settings), plan.card_step(view)
        card = model_card(
            self.settings,
            step=card_step,
            final=final_step is not None and card_step == final_step,
            checkpoints=sorted(after.steps),
            images=plan.card_images(after),
            scores={s: scores[s] for s in sorted(after.validation) if s in scores},
        )
        ops.append(CommitOperationAdd(CARD, card.encode()))
        return ops

    def _committed(self, plan: Round, view: HubView, pending: dict[int, _Pending]) -> None:
        with self._cond:
            self._commits += 1
            after = plan.after(view, self.settings)
            if self._view is view:  # not sent back to listing by a reconcile meanwhile
                self._view = after
            # Every step in the snapshot is settled: uploaded, already there, or coalesced away.
            for step, entry in pending.items():
                if self._pending.get(step) is entry:  # not submitted again meanwhile
                    del self._pending[step]
                    self._skipped += step not in after.steps and step != plan.root
            for step in plan.images:
                if self._images.get(step) is plan.images[step]:
                    del self._images[step]
            self._squash_due = self._squash_due or (self.settings.super_squash and bool(plan.delete))
        for step in [s for s in self._fetched if s not in self._pending]:
            shutil.rmtree(self._fetched.pop(step), ignore_errors=True)
        hub_steps = sorted(after.steps)
        log.info("Hub mirror: %s now holds checkpoints %s", self.settings.repo_id, hub_steps)
        if self._pushed_cb is not None:
            try:
                self._pushed_cb(
                    {"added": sorted(plan.add), "deleted": sorted(plan.delete), "root": plan.root, "hub_steps": hub_steps}
                )
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
            self._api.super_squash_history(
                self.settings.repo_id, token=token, commit_message=f"Squash history (relay, {self.settings.run_name})"
            )
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


def as_export(path: Path, dtype: str) -> str | bytes:
    """A checkpoint's adapter file as Trainer.export writes it: the same tensors and metadata, in the export
    dtype (bf16 for mixed_precision bf16). fp32 is the checkpoint's own file, sent as is."""
    if dtype == "fp32":
        return str(path)
    import safetensors
    import torch
    from safetensors.torch import load_file

    with safetensors.safe_open(str(path), "pt") as fh:
        metadata = fh.metadata()
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(str(path)).items()}
    return ckpt.safetensors_bytes(tensors, metadata)  # the export's bytes exactly (sorted header)
