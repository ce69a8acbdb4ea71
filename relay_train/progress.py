"""The one progress display for a person: a rich bar on a terminal, periodic log lines elsewhere."""

from __future__ import annotations

import logging
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from relay_train.trainer import StepReport

log = logging.getLogger(__name__)


class ProgressDisplay:
    """Use as a context manager; feed it `on_step` reports."""

    def __init__(self, total_steps: int, start_step: int = 0, console: Console | None = None, log_lines: int = 20):
        self.console = console or Console(stderr=True)
        self.total, self.start = total_steps, start_step
        self.log_every = max(1, (total_steps - start_step) // log_lines)
        self.last_logged, self.t0 = start_step, time.perf_counter()
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
        if report.step - self.last_logged >= self.log_every or report.step == self.total:
            done = report.step - self.start
            rate = done / max(time.perf_counter() - self.t0, 1e-9)
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
            self.last_logged = report.step


def _clock(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
