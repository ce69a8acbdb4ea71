"""The one progress display for a person: a rich bar on a terminal, periodic log lines elsewhere."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from relay_train.trainer import StepReport

log = logging.getLogger(__name__)


class ProgressDisplay:
    """Use as a context manager; feed it `on_step` reports.

    Off a terminal (a pipe, a job's log) it logs the first report, so a reader knows the loop runs, then one
    every `log_seconds` and the last step: a line count set by time stays readable at any step rate."""

    def __init__(
        self,
        total_steps: int,
        start_step: int = 0,
        console: Console | None = None,
        log_seconds: float = 10.0,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.console = console or Console(stderr=True)
        self.total, self.start = total_steps, start_step
        self.log_seconds, self.clock = log_seconds, clock
        self.logged_at: float | None = None  # no line yet
        self.t0 = clock()
        self.bar = (
            Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[its]:.2f} it/s"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            if self.console.is_terminal
            else None
        )
        self.task = None

    def __enter__(self) -> "ProgressDisplay":
        if self.bar:
            self.bar.start()
            self.task = self.bar.add_task("train", total=self.total, completed=self.start, loss=float("nan"), lr=0.0, its=0.0)
        return self

    def __exit__(self, *exc) -> None:
        if self.bar:
            self.bar.stop()

    def __call__(self, report: StepReport) -> None:
        if self.bar:
            self.bar.update(self.task, completed=report.step, loss=report.loss, lr=report.lr, its=report.steps_per_second)
            return
        now = self.clock()
        if self.logged_at is None or now - self.logged_at >= self.log_seconds or report.step == self.total:
            done = report.step - self.start
            rate = done / max(now - self.t0, 1e-9)
            eta = (self.total - report.step) / rate if rate > 0 else float("inf")
            log.info(
                "step %d/%d  loss %.4f  lr %.2e  %.2f it/s  eta %s",
                report.step,
                self.total,
                report.loss,
                report.lr,
                report.steps_per_second,
                _clock(eta),
            )
            self.logged_at = now


def _clock(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
