"""Weights & Biases tracking (`report_to wandb`), off the training path and resumable from storage.

The W&B run id is kept in the run's storage (`relay/wandb-run-id`), so a restart or a resubmitted
job continues the same W&B run (`resume="allow"`). Every metric is logged against our own `step`
metric instead of W&B's internal `_step`: a run resumed from checkpoint 5000 after logging up to
step 5300 logs steps 5000-5300 again, and W&B would drop rows with a `_step` below its last one.

`log_step` and `log_validation` only queue; a background thread calls `run.log` (encoding validation
images costs ~0.4 s, far too long for the caller). `report_to none` gives a NullTracker that does nothing.
Offline mode (WANDB_MODE=offline) writes the run under `<dir>/wandb/offline-run-*`.
"""

from __future__ import annotations

import io
import logging
import uuid
from pathlib import Path
from typing import Any

from orchestrator.core.background import Background
from orchestrator.core.ledger import EventType
from orchestrator.core.store import RunStorage
from relay_train.config import TrainConfig
from relay_train.safe_write import write_atomic

log = logging.getLogger(__name__)

RUN_ID = "relay/wandb-run-id"
Row = tuple[EventType, int, Any, Any]  # (kind, step, metrics or images, scores)
STEP_METRIC = "step"

LOGGED: dict[EventType, str] = {  # what W&B logs, as <prefix>/<key> columns against STEP_METRIC
    EventType.PROGRESS: "train",  # rank 0's per-step metrics (the steward's on_metrics)
    EventType.VALIDATION: "validation",  # scores and images (the steward forwards them with the event)
}
NOT_LOGGED: dict[EventType, str] = {  # and why: W&B charts metrics; the run's story is the ledger's
    EventType.RUN_STARTED: "the resolved config is the W&B run's config",
    EventType.ATTEMPT: "relay status and the webhook tell restarts",
    EventType.CHECKPOINT: "relay status and the webhook tell checkpoints",
    EventType.EMERGENCY_CHECKPOINT: "relay status and the webhook tell preemptions",
    EventType.PREEMPTION_NOTICE: "relay status and the webhook tell preemptions",
    EventType.RESIZE: "relay status and the webhook tell resizes",
    EventType.WAITING_FOR_CAPACITY: "relay status and the webhook tell outages",
    EventType.HUB_PUSHED: "the webhook tells it",
    EventType.EXPORTED: "relay status names the adapter",
    EventType.WARNING: "the driver's display and the webhook tell it",
    EventType.STOP_REQUESTED: "the run's end is W&B's finish",
    EventType.COMPLETED: "the run's end is W&B's finish",
    EventType.STOPPED: "the run's end is W&B's finish",
    EventType.FAILED: "the run's end is W&B's finish",
}


class NullTracker:
    """`report_to none`: accepts every call and does nothing."""

    run_id: str | None = None
    run_dir: Path | None = None

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def log_validation(self, step: int, images: list[tuple[str, Any]], scores: dict[str, float]) -> None:
        pass

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def start(self) -> NullTracker:
        return self

    def close(self, timeout: float = 30.0) -> None:
        pass

    def finish(self, timeout: float = 30.0) -> None:
        pass


def run_id(storage: RunStorage | None, fallback: Path) -> str:
    """The run's W&B id: read from storage, or made and written there on the first start.
    Without storage it is kept in a local file (fallback)."""
    if storage is not None:
        known = storage.read_bytes(RUN_ID)
        if known:
            return known.decode().strip()
    elif fallback.is_file():
        return fallback.read_text().strip()
    new = uuid.uuid4().hex[:12]  # W&B ids: letters and digits, unique per project
    if storage is not None:
        storage.write(RUN_ID, new.encode())
    else:
        write_atomic(fallback, new.encode())
    return new


def _picture(image: Any):
    """A PIL image from PIL or PNG bytes."""
    if isinstance(image, (bytes, bytearray)):
        from PIL import Image

        return Image.open(io.BytesIO(image))
    return image


class Tracker:
    """One W&B run fed from a bounded queue by a background thread. Build it with Tracker.open; `start()`
    starts the thread (rows queued before it are logged once it runs, or at finish)."""

    def __init__(self, run, max_queue: int = 1024) -> None:
        self.run = run
        self.max_queue = max_queue
        self._failed = False
        # a failed row is not retried (W&B's own client retries its uploads); a full queue drops the oldest
        # step row, validation is rarer and kept
        self._rows: Background[Row] = Background(
            "wandb-tracker",
            lambda row: self.run.log(self._row(*row)),
            max_queue=max_queue,
            drop=lambda rows: next((i for i, r in enumerate(rows) if r[0] == EventType.PROGRESS), 0),
            on_drop=self._dropped,
            on_give_up=self._gave_up,
        )

    @property
    def dropped(self) -> int:
        return self._rows.stats["dropped"]

    def start(self) -> Tracker:
        """Start the thread that logs queued rows to W&B (once)."""
        self._rows.start()
        return self

    @classmethod
    def open(
        cls, config: TrainConfig, run_name: str, storage: RunStorage | None = None, *, wandb_dir: Path | None = None
    ) -> Tracker | NullTracker:
        """Start or resume the run's W&B run. W&B trouble never stops training: it logs an error and
        returns a NullTracker."""
        if config.report_to != "wandb":
            return NullTracker()
        folder = Path(wandb_dir or config.output_dir)
        try:
            import wandb

            folder.mkdir(parents=True, exist_ok=True)
            wid = run_id(storage, folder / RUN_ID)
            run = wandb.init(
                project=config.tracker_project_name,
                name=config.tracker_run_name or run_name,
                id=wid,
                resume="allow",
                dir=str(folder),
                config=config.resolved_dict(),
                reinit="create_new",
                settings=wandb.Settings(console="off", silent=True),
            )
            run.define_metric(STEP_METRIC)
            run.define_metric("*", step_metric=STEP_METRIC)
        except Exception as exc:
            log.error("W&B tracking is off for this run: could not start the W&B run (%s: %s)", type(exc).__name__, exc)
            return NullTracker()
        log.info("W&B run %s (%s) in %s", wid, "offline" if run.offline else "online", run.dir)
        return cls(run)

    @property
    def run_id(self) -> str:
        return self.run.id

    @property
    def run_dir(self) -> Path:
        """The run's folder (offline-run-*/ or run-*/), holding run-<id>.wandb and files/."""
        return Path(self.run.dir).parent

    # -- queued calls ------------------------------------------------------------------------------
    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        """loss, lr, grad_norm, steps_per_second, samples_per_second (any numbers); logged as train/<key>."""
        self._put((EventType.PROGRESS, step, dict(metrics), None))

    def log_validation(self, step: int, images: list[tuple[str, Any]], scores: dict[str, float]) -> None:
        """(caption, PIL image or PNG bytes) pairs and scores such as clip_score; logged as validation/<key>."""
        self._put((EventType.VALIDATION, step, list(images), dict(scores)))

    def _put(self, item: Row) -> None:
        self._rows.put(item)

    def _dropped(self, row: Row) -> None:
        if self.dropped == 1 or self.dropped % 100 == 0:
            log.warning("W&B queue full: %d row(s) dropped so far", self.dropped)

    def _gave_up(self, row: Row, decision) -> None:
        if not self._failed:
            log.error("W&B log failed (%s); later rows may be lost too", decision.reason)
        self._failed = True

    @staticmethod
    def _row(kind: EventType, step: int, first: Any, second: Any) -> dict[str, Any]:
        prefix = LOGGED[kind]
        if kind == EventType.PROGRESS:
            return {STEP_METRIC: step, **{(k if "/" in k else f"{prefix}/{k}"): v for k, v in first.items()}}
        import wandb

        row = {STEP_METRIC: step, **{(k if "/" in k else f"{prefix}/{k}"): v for k, v in second.items()}}
        if first:
            row[f"{prefix}/images"] = [wandb.Image(_picture(img), caption=caption) for caption, img in first]
        return row

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """The steward's service hook for rank 0's per-step metrics."""
        self.log_step(step, metrics)

    def close(self, timeout: float = 30.0) -> None:
        """The steward's service hook at shutdown."""
        self.finish(timeout)

    def finish(self, timeout: float = 30.0) -> None:
        """Log what is queued (within timeout), then close the W&B run."""
        if not self._rows.close(timeout) and self._rows.thread.is_alive():
            log.warning("W&B: %d row(s) not logged within %.0f s of finish", self._rows.pending(), timeout)
        try:
            self.run.finish()
        except Exception as exc:
            log.error("W&B finish failed (%s: %s)", type(exc).__name__, exc)
