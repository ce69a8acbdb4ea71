"""The run's steward: one Ray actor per run, on the head node, that does everything a checkpoint or an
event sets off, off the training path.

Workers (rank 0) tell it about progress, attempts, preemption notices and checkpoints with
fire-and-forget calls; they never wait for it. A thread watches storage for checkpoints Ray has
committed (named in its snapshot, manifest present) and, for each, writes the ledger and drives the
services that follow a commit. A resubmitted job makes a new steward, which reads the ledger and
storage back and carries on.
"""

from __future__ import annotations

import logging
import threading
import time

import ray

from orchestrator.core.ledger import ENDINGS, PROGRESS, EventType, Ledger, summarize
from orchestrator.core.policy import AttemptFacts, attempt_reason, stall_seconds
from orchestrator.core.store import RunStorage
from relay_train.logs import configure_logging

log = logging.getLogger(__name__)


class Steward:
    """The steward's logic, usable in-process (the unit tests); `RunSteward` is its actor."""

    def __init__(
        self,
        storage: RunStorage,
        total_steps: int = 0,
        poll_seconds: float = 5.0,
        progress_every: float = 10.0,
        services: list | None = None,
    ):
        self.storage, self.total_steps = storage, total_steps
        self.ledger = Ledger(storage)
        self.poll_seconds, self.progress_every = poll_seconds, progress_every
        self.services = services or []  # objects with on_event(event: dict) (optional start(), close(timeout))
        self.lock = threading.Lock()
        self.committed = set(self._ledger_steps(EventType.CHECKPOINT))
        self.progress: dict | None = storage.read_json(PROGRESS)
        self.metrics: dict = {}  # rank 0's latest loss, lr, ... (what the driver's progress line shows)
        self.stop_requested = False  # the driver asked the run to checkpoint and stop (Ctrl-C, SIGTERM)
        self.fatal_error: dict | None = None  # {"code", "message"} from a worker: no restart can cure it
        self._nodes: set[str] = set()  # the cluster's live nodes when the current attempt began
        self._waiting = False  # this attempt's outage is recorded (check_capacity)
        self.stall_after: float | None = None  # the cluster's stall_seconds (run_started), else policy's default
        self._progress_written = 0.0
        self._progress_unwritten = False  # a tick since the last write (written by the watcher if no tick follows)
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="relay-steward-watch", daemon=True)

    def start(self) -> Steward:
        """Start the services (those with a start()), then the thread that watches storage. Once."""
        if self._watcher.ident is None:
            self._tell("start")
            self._watcher.start()
        return self

    def _ledger_steps(self, kind: EventType) -> list[int]:
        return [e["step"] for e in self.ledger.events if e["type"] == kind]

    # -- events from the driver and the workers ---------------------------------------------------------
    def record(self, kind: EventType, step: int | None = None, **fields) -> None:
        with self.lock:
            event = self.ledger.record(kind, step, **fields)
        log.info("ledger: %s%s", kind, f" at step {step}" if step is not None else "")
        self._tell("on_event", event)

    def _tell(self, hook: str, *args) -> None:
        """Call `hook` on every service that has it; a service's trouble never reaches the caller."""
        for service in self.services:
            handler = getattr(service, hook, None)
            if handler is None:
                continue
            try:
                handler(*args)
            except Exception:
                log.exception("steward service %s failed in %s", type(service).__name__, hook)

    def run_started(self, **fields) -> None:
        self.total_steps = fields.get("total_steps", self.total_steps)
        self.stall_after = fields.get("stall_seconds")
        self.record(EventType.RUN_STARTED, **fields)

    def attempt(self, step: int, world_size: int, total_steps: int, resumed: bool) -> None:
        """A worker group is about to train from `step`. Close the previous attempt's books first: its
        last progress is what the ledger needs to count the steps lost and the time to resume."""
        self.total_steps = total_steps
        previous = [e for e in self.ledger.events if e["type"] == EventType.ATTEMPT]
        if self.progress and previous and self.progress.get("time", 0) > previous[-1]["time"]:
            self.record(
                EventType.PROGRESS,
                self.progress["step"],
                time=self.progress["time"],
                steps_per_second=self.progress.get("steps_per_second"),
            )
        last = previous[-1] if previous else {}
        alive = alive_nodes()
        facts = AttemptFacts(
            resumed=resumed,
            first_in_job=bool(previous) and self._job_started_after(last),
            had_attempt_before=bool(previous),
            notice_since_last=bool(previous) and self._notice_since(last),
            nodes_lost_since_last=sorted(self._nodes - alive) if self._nodes and alive else [],
            world_size=world_size,
            previous_world_size=last.get("world_size"),
            previous_job_ended=any(e["type"] in ENDINGS and e["time"] >= last.get("time", 0) for e in self.ledger.events),
        )
        reason = attempt_reason(facts)
        self._nodes, self._waiting = alive, False
        lost = max(self.progress["step"] - step, 0) if (resumed and self.progress) else 0
        back_in = round(time.time() - self.progress["time"], 1) if (resumed and self.progress) else None
        if previous and last.get("world_size") != world_size:
            log.warning("worker group resized: %s → %d worker(s) at step %d", last.get("world_size"), world_size, step)
            self.record(EventType.RESIZE, step, world_size=world_size, previous_world_size=last.get("world_size"))
        extra = {"nodes_lost": facts.nodes_lost_since_last} if facts.nodes_lost_since_last else {}
        self.record(
            EventType.ATTEMPT,
            step,
            world_size=world_size,
            total_steps=total_steps,
            reason=reason,
            steps_lost=lost,
            **({"time_to_resume": back_in} if back_in is not None else {}),
            **extra,
        )
        self.progress = {"step": step, "time": time.time(), "steps_per_second": None, "total_steps": total_steps}

    def _job_started_after(self, event: dict) -> bool:
        return any(e["type"] == EventType.RUN_STARTED and e["time"] > event["time"] for e in self.ledger.events)

    def _notice_since(self, event: dict) -> bool:
        return any(e["type"] == EventType.PREEMPTION_NOTICE and e["time"] >= event["time"] for e in self.ledger.events)

    def tick(self, step: int, steps_per_second: float | None = None, metrics: dict | None = None) -> None:
        """Rank 0's progress; written to storage at most every progress_every seconds."""
        now = time.time()
        self.progress = {
            "step": step,
            "time": now,
            "total_steps": self.total_steps,
            "steps_per_second": steps_per_second or (self.progress or {}).get("steps_per_second"),
        }
        if metrics:
            self.metrics = dict(metrics, step=step)
            self._tell("on_metrics", step, metrics)
        self._progress_unwritten = True
        if now - self._progress_written >= self.progress_every:
            self._write_progress()

    def flush_progress(self) -> None:
        """Write a tick the throttle held back once progress_every has passed, so that a loop that stops
        ticking (a hang, a held step, a lost node) leaves its true last step for `relay status`."""
        if self._progress_unwritten and time.time() - self._progress_written >= self.progress_every:
            self._write_progress()

    def _write_progress(self) -> None:
        self._progress_written, self._progress_unwritten = time.time(), False
        try:
            self.storage.write_json(PROGRESS, self.progress)
        except OSError as exc:
            log.warning("could not write progress to storage: %s", exc)

    def reported(self, step: int, emergency: bool = False, **fields) -> None:
        """A worker handed checkpoint-<step> to Ray; the watcher records it once it is committed."""
        if emergency:
            self.record(EventType.EMERGENCY_CHECKPOINT, step, **fields)

    def _completion(self, step: int | None) -> dict:
        """The completed event's figures, from the same fold of the ledger that `relay status` shows."""
        end = {"time": time.time(), "type": EventType.COMPLETED, **({"step": step} if step is not None else {})}
        summary = summarize(self.storage.run_name, [*self.ledger.events, end], progress=self.progress)
        exported = [e for e in self.ledger.events if e["type"] == EventType.EXPORTED]
        files = exported[-1]["files"] if exported else []
        return {
            "adapters": ", ".join(files) or "see the last checkpoint",
            "goodput": f"{100 * summary.goodput:.1f}%" if summary.goodput is not None else "unknown",
            "preemptions": summary.preemption_notices,
            "restarts": max(len(summary.attempts) - 1, 0),
            "steps_lost": summary.steps_lost,
            "wall_hours": round(summary.wall_seconds / 3600, 3),
        }

    # -- what the driver asks -----------------------------------------------------------------------
    def view(self, since: int = 0) -> dict:
        """The driver's display: progress, rank 0's latest metrics, and the ledger's events from `since`."""
        with self.lock:
            events = self.ledger.events[since:]
            count = len(self.ledger.events)
        return {
            "progress": self.progress,
            "metrics": self.metrics,
            "events": events,
            "count": count,
            "total_steps": self.total_steps,
            "fatal": self.fatal_error,
        }

    def request_stop(self) -> None:
        """Ctrl-C or SIGTERM at the driver: the workers checkpoint at their next check and return."""
        if not self.stop_requested:
            self.stop_requested = True
            self.record(EventType.STOP_REQUESTED, (self.progress or {}).get("step"))

    def should_stop(self) -> bool:
        return self.stop_requested

    def fatal(self, code: int, message: str) -> None:
        """A worker met an error no restart can cure (orchestrator.core.failure.decide said Fatal, with its
        exit code): the driver sees it in view() and ends the run instead of letting Ray retry it."""
        if self.fatal_error is None:
            self.fatal_error = {"code": code, "message": message}

    # -- the watcher ------------------------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll()
                self.flush_progress()
                self.check_capacity()
            except Exception:  # noqa: BLE001 - the watcher outlives any one bad look; close() polls again
                log.exception("checkpoint watch: this look at %s failed; the next one follows", self.storage.describe())

    def check_capacity(self, alive: set[str] | None = None) -> bool:
        """Nodes of the current group gone and no step for policy.stall_seconds: Ray Train waits for room to
        restart the group. Recorded once per attempt (the ledger, the webhook's alert, `relay status`);
        the next attempt carries the steps lost and the time to resume. Returns whether it recorded."""
        progress = self.progress
        if self._waiting or not progress or not self._nodes:
            return False
        if time.time() - progress["time"] < stall_seconds(progress.get("steps_per_second"), self.stall_after):
            return False
        alive = alive_nodes() if alive is None else alive
        lost = sorted(self._nodes - alive) if alive else []  # none alive: the GCS did not answer, not an outage
        if not lost:
            return False
        self._waiting = True
        log.error(
            "no step since %s and %d node(s) of the group are gone: waiting for capacity",
            time.strftime("%H:%M:%S", time.localtime(progress["time"])),
            len(lost),
        )
        self.record(EventType.WAITING_FOR_CAPACITY, progress["step"], nodes_lost=lost, since=progress["time"])
        return True

    def poll(self) -> list[int]:
        """Record checkpoints newly committed to storage; returns their steps."""
        try:
            steps = self.storage.checkpoint_steps()
        except OSError as exc:
            log.warning("could not list checkpoints in %s: %s", self.storage.describe(), exc)
            return []
        new = [s for s in steps if s not in self.committed]
        for step in new:
            self.committed.add(step)
            if self.progress and self.progress.get("step", 0) <= step:
                self.progress["time"] = max(self.progress["time"], time.time())
            self.record(EventType.CHECKPOINT, step, uri=self.storage.describe(f"checkpoint-{step}"), kept=steps)
            if self.progress:
                self._write_progress()
        return new

    def close(self, final: dict | None = None, timeout: float = 60.0) -> None:
        """Stop watching after a last look at storage, then end in an order that loses nothing: the
        services that still make news (the last validation) finish first; then the run's end is
        recorded (with where the adapter is and the goodput, on completion; the Hub's final push
        follows it); then the others flush, the webhook last, since it hears everything."""
        self._stop.set()
        if self._watcher.ident is not None:
            self._watcher.join(timeout=self.poll_seconds + 5)
        self.poll()
        producers = [s for s in self.services if getattr(s, "makes_news", False)]
        listeners = [s for s in reversed(self.services) if s not in producers]
        self._close(producers, timeout)
        if final:
            final = dict(final)
            if final["type"] == EventType.COMPLETED:
                final.update(self._completion(final.get("step")))
            self.record(final.pop("type"), **final)
        if self.progress:
            self._write_progress()
        self._close(listeners, timeout)

    def _close(self, services: list, timeout: float) -> None:
        for service in services:
            try:  # a service may bound its own wait (the webhook: a dead receiver never holds the end)
                service.close(min(timeout, getattr(service, "close_seconds", timeout)))
            except Exception:
                log.exception("steward service %s failed to close", type(service).__name__)


def build_services(
    config,
    storage: RunStorage,
    record,
    wandb_dir: str | None = None,
    working_dir: str | None = None,
    validation_options: dict | None = None,
) -> list:
    """What follows the run's events, per its config: the webhook notifier, the W&B tracker, the Hub
    mirror and the validation pool. `record(kind, step=None, **fields)` puts their own news (Hub
    commits, validations, warnings) in the ledger, which tells the others. Built, not started:
    Steward.start() starts them."""
    from orchestrator.services.hub import HubMirror
    from orchestrator.services.notify import Notifier, WebhookType
    from orchestrator.services.tracking import Tracker
    from orchestrator.services.validation import ValidationService, flat_scores

    notifier = (
        Notifier(config.webhook, storage.run_name, spool=storage, project=config.tracker_project_name) if config.webhook else None
    )
    tracker = Tracker.open(config, storage.run_name, storage, wandb_dir=wandb_dir)
    mirror = HubMirror.for_run(
        config,
        storage,
        warn=lambda message: record(EventType.WARNING, message=message),
        on_pushed=lambda info: record(EventType.HUB_PUSHED, info["root"], **info),
    )

    def forward(step: int, summary: dict, images: list[tuple[str, bytes]]) -> None:
        """A validation's images go where the ledger's line cannot carry them."""
        tracker.log_validation(step, images, flat_scores(summary))
        if mirror is not None:
            mirror.note_validation(step, images, summary.get("scores", {}))
        if notifier is not None:
            pngs = [(name, data) for name, data in images if name != "grid.png"]
            notifier.event(
                WebhookType.VALIDATION,
                "info",
                step,
                f"validation at step {step}",
                {"scores": summary.get("scores", {})},
                images=pngs,
            )

    validation = ValidationService.for_run(
        config, storage, record, forward, working_dir=working_dir, **(validation_options or {})
    )
    # the notifier first: it hears every event, the others' warnings included (and closes last)
    return [s for s in (notifier, tracker, mirror, validation) if s is not None]


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class RunSteward(Steward):
    """The steward as an actor beside the driver. Calls to it are fire-and-forget from workers."""

    def __init__(
        self,
        storage: RunStorage,
        config=None,
        wandb_dir: str | None = None,
        working_dir: str | None = None,
        validation_options: dict | None = None,
        **kwargs,
    ):
        configure_logging()
        if config is not None:
            from orchestrator.core import redact

            redact.install(redact.secret_values(config))
        super().__init__(storage, **kwargs)
        if config is not None:  # after the ledger exists: the services record into it
            self.services.extend(build_services(config, storage, self.record, wandb_dir, working_dir, validation_options))
        self.start()  # the actor is the run's composition root: its services run as soon as it exists

    def ready(self) -> bool:
        return True


def alive_nodes() -> set[str]:
    """The ids of the cluster's live nodes (empty outside Ray)."""
    try:
        return {n["NodeID"] for n in ray.nodes() if n.get("Alive")} if ray.is_initialized() else set()
    except Exception:  # the GCS briefly unreachable: no node is reported lost
        return set()


def steward_name(run_name: str) -> str:
    return f"relay-steward:{run_name}"


def get_steward(run_name: str):
    """The run's steward actor, or None (a plain `relay train`, or the steward is gone)."""
    try:
        return ray.get_actor(steward_name(run_name))
    except ValueError:
        return None
