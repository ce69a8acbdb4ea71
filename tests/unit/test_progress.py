"""The progress display off a terminal: the first report at once, then one line per interval, and the last."""

from __future__ import annotations

import io
import logging

from rich.console import Console

from relay_train.progress import ProgressDisplay
from relay_train.trainer import StepReport


def _report(step: int) -> StepReport:
    return StepReport(step, 300, 1.0, 1e-4, 0, 20.0, 0.5)


def test_a_pipe_gets_the_first_report_then_one_line_per_interval_and_the_last(caplog):
    now = [0.0]
    pipe = Console(file=io.StringIO())  # not a terminal: log lines, no bar
    display = ProgressDisplay(300, console=pipe, log_seconds=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="relay_train.progress"), display:
        for step in range(10, 301, 10):  # the trainer reports every 10 steps, here one a second
            now[0] += 1.0
            display(_report(step))
    logged = [int(r.getMessage().split()[1].split("/")[0]) for r in caplog.records]
    assert logged == [10, 110, 210, 300]
    assert "it/s" in caplog.records[0].getMessage() and "eta" in caplog.records[0].getMessage()
