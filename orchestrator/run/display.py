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

from orchestrator.services.messages import (  # noqa: F401 - the driver's lines, read here too (display.MILESTONES, ...)
    MILESTONES,
    NOT_SHOWN,
    RESUMED_BECAUSE,
    milestone,
)

log = logging.getLogger(__name__)


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
        since: int = 0,
    ):
        self.view, self.where, self.every, self.poll = view, where, every, poll
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.seen = since  # the ledger's events before this job are history, not milestones
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
