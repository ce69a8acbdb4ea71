"""Waiting for a condition in a test: a bounded poll that fails naming what it waited for."""

from __future__ import annotations

import subprocess
import time
from typing import TypeVar
from collections.abc import Callable

import pytest

T = TypeVar("T")


def wait_for(what: str, check: Callable[[], T], timeout: float, every: float = 1.0) -> T:
    """Poll `check()` until it returns something truthy (returned); fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def training_past(proc: subprocess.Popen, status: Callable[[], dict | None], step: int) -> Callable[[], dict | None]:
    """A `wait_for` check: `status()` says running past `step` (the check returns that status); fails at once,
    with the process's output, if `proc` (the job, the supervisor) ended first."""

    def check() -> dict | None:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args!r} ended early ({proc.returncode}): {proc.communicate()[0][-4000:]}")
        seen = status()
        return seen if seen and seen["state"] == "running" and seen["step"] > step else None

    return check
