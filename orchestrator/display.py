"""What a person at the driver sees: one live progress line and a line per milestone.

The driver (`relay launch`, `relay demo`, or `jobs/train.py` under `ray job submit`) polls the run's
steward about once a second for its progress and the ledger's new events, off the training path. On a
terminal the progress line is a live bar; in a pipe or a job log it is printed every `every` seconds.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

from orchestrator.ledger import AttemptReason, EventType
from orchestrator.policy import UNPLANNED

log = logging.getLogger(__name__)


Where = Callable[[str], str]  # names a file in the run's storage, given its path there
Line = tuple[str, str]  # (level, text)


def _checkpoint(event: dict, step: int | None, where: Where) -> Line:
    return "info", f"checkpoint {step} committed: {event.get('uri', where(f'checkpoint-{step}'))}"


def _validation(event: dict, step: int | None, where: Where) -> Line:
    if event.get("benchmark"):
        return "info", f"validation of the base model done: {where('relay/validation/base/grid.png')}"
    scores = event.get("scores") or {}
    shown = "; ".join(f"{v} CLIP {s['mean']:.2f}" for v, s in scores.items() if isinstance(s, dict) and "mean" in s)
    grid = f"{event['location']}/grid.png" if event.get("location") else where(f"relay/validation/checkpoint-{step}/grid.png")
    return "info", f"validation at step {step} done: {grid}" + (f" ({shown})" if shown else "")


def _emergency_checkpoint(event: dict, step: int | None, where: Where) -> Line:
    state = "committed" if event.get("committed", True) else "NOT committed"
    secs = event.get("seconds_from_notice")
    return "warning", f"emergency checkpoint {step} {state}" + (f" {secs:.1f} s after the notice" if secs else "")


RESUMED_BECAUSE = {
    AttemptReason.NODE_LOST: "a node was lost",
    AttemptReason.FAILURE: "a worker failed",
    AttemptReason.PREEMPTION: "preempted",
    AttemptReason.RESUBMITTED: "resubmitted",
    AttemptReason.RESIZE: "resized",
}  # a fresh attempt is no milestone: the run just began


def _attempt(event: dict, step: int | None, where: Where) -> Line | None:
    reason = event.get("reason", AttemptReason.FRESH)
    if reason == AttemptReason.FRESH:
        return None
    lost = event.get("steps_lost")
    level = "error" if reason in UNPLANNED else "warning"
    return level, (
        f"resumed at step {step} ({RESUMED_BECAUSE.get(reason, reason)}"
        + (f"; {lost} step(s) lost" if lost else "")
        + (f"; back in {event['time_to_resume']:.0f} s" if event.get("time_to_resume") else "")
        + ")"
    )


MILESTONES: dict[EventType, Callable[[dict, int | None, Where], Line | None]] = {
    EventType.CHECKPOINT: _checkpoint,
    EventType.VALIDATION: _validation,
    EventType.PREEMPTION_NOTICE: lambda e, step, where: ("warning", f"preemption notice at step {step}: checkpointing now"),
    EventType.EMERGENCY_CHECKPOINT: _emergency_checkpoint,
    EventType.ATTEMPT: _attempt,
    EventType.RESIZE: lambda e, step, where: (
        "warning",
        f"worker group resized: {e.get('previous_world_size')} → {e.get('world_size')}",
    ),
    EventType.HUB_PUSHED: lambda e, step, where: ("info", f"checkpoint {step} pushed to the Hub"),
    EventType.WARNING: lambda e, step, where: ("warning", str(e.get("message", ""))),
    EventType.STOP_REQUESTED: lambda e, step, where: ("warning", "stop requested: checkpointing at the next step boundary"),
    EventType.COMPLETED: lambda e, step, where: (
        "info",
        f"completed at step {step}; adapter: {e.get('adapters', '-')}; goodput {e.get('goodput', '-')}",
    ),
    EventType.STOPPED: lambda e, step, where: ("warning", f"stopped at step {step}; run the same command to resume"),
    EventType.FAILED: lambda e, step, where: ("error", f"failed: {e.get('error', '')}"),
}
NOT_SHOWN: dict[EventType, str] = {  # and why a person at the driver does not see them
    EventType.RUN_STARTED: "the driver logs the run's start itself (launch.run_on_ray)",
    EventType.PROGRESS: "the progress line shows it",
    EventType.EXPORTED: "the completed line names the adapter",
}


def milestone(event: dict, where: Where) -> Line | None:
    """(level, line) for a ledger event a person wants to see, or None. `where(rel)` names a file in the
    run's storage. Pure: tests feed it events."""
    shown = MILESTONES.get(event.get("type"))
    return shown(event, event.get("step"), where) if shown else None


def progress_line(progress: dict | None, metrics: dict | None, total: int) -> str:
    """step/total, loss, steps/s and ETA, from the steward's view."""
    progress, metrics = progress or {}, metrics or {}
    step, total = progress.get("step", 0), progress.get("total_steps") or total
    rate = progress.get("steps_per_second")
    eta = (total - step) / rate if rate and total else None
    loss = metrics.get("loss")
    parts = [
        f"step {step}/{total or '?'}",
        f"loss {loss:.4f}" if isinstance(loss, (int, float)) else "loss -",
        f"{rate:.2f} steps/s" if rate else "- steps/s",
        f"ETA {clock(eta)}",
    ]
    return "  ".join(parts)


def clock(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class DriverDisplay:
    """A thread that polls `view(since) -> dict` (the steward's) and prints; `close()` prints the rest."""

    def __init__(
        self,
        view: Callable[[int], dict],
        where: Callable[[str], str],
        stream: TextIO | None = None,
        every: float = 10.0,
        poll: float = 1.0,
    ):
        self.view, self.where, self.every, self.poll = view, where, every, poll
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.seen = 0
        self.last_printed = 0.0
        self.last_line = ""
        self.total = 0
        self.fatal: dict | None = None  # the steward's fatal_error, once a worker reported one
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="relay-display", daemon=True)
        self._lock = threading.Lock()

    def start(self) -> DriverDisplay:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            self.refresh()

    def refresh(self) -> None:
        try:
            state = self.view(self.seen)
        except Exception as exc:  # the steward busy or restarting: try again at the next poll
            log.debug("display: steward view failed: %s", exc)
            return
        with self._lock:
            self.fatal = state.get("fatal") or self.fatal
            self.seen = state.get("count", self.seen)
            self.total = state.get("total_steps") or self.total
            for event in state.get("events", []):
                shown = milestone(event, self.where)
                if shown:
                    self._print(shown[1], shown[0])
            line = progress_line(state.get("progress"), state.get("metrics"), self.total)
            if (state.get("progress") or {}).get("steps_per_second") is None and not self.live:
                return  # nothing trained yet in this attempt
            now = time.monotonic()
            if self.live:
                self._live(line)
            elif line != self.last_line and now - self.last_printed >= self.every:
                self._print(line)
                self.last_printed, self.last_line = now, line

    def _live(self, line: str) -> None:
        self.stream.write("\r\x1b[2K" + line)
        self.stream.flush()
        self.last_line = line

    def _print(self, text: str, level: str = "info") -> None:
        label = {"error": " ERROR", "warning": " WARNING"}.get(level, "")
        if self.live:
            self.stream.write("\r\x1b[2K")
        self.stream.write(f"{time.strftime('%H:%M:%S')}{label} {text}\n")
        if self.live and self.last_line:
            self.stream.write(self.last_line)
        self.stream.flush()

    def close(self) -> None:
        """Stop polling, then show whatever the steward recorded last (the run's end)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.poll + 5)
        self.refresh()
        if self.live:
            self.stream.write("\n")
            self.stream.flush()
