"""Wait for a line from a running process with a deadline that fires.

A `for line in proc.stderr` loop checks its deadline only when a line arrives, so a silent process
hangs it; here a thread drains the stream (the process never blocks on a full pipe) and the wait
blocks on a queue with a timeout.
"""

from __future__ import annotations

import queue
import re
import subprocess
import threading
import time
from typing import IO


class Lines:
    """`Lines(proc.stderr)`: `wait_for(pattern, timeout)`, then `text()` for everything it printed."""

    def __init__(self, stream: IO[str]):
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._drain, args=(stream,), daemon=True)
        self._thread.start()

    def _drain(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put(None)  # end of stream

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        """The first match of `pattern` in a line; AssertionError with the output's tail on timeout or end."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                raise AssertionError(f"output ended before a line matched {pattern!r}:\n{''.join(self.seen)[-3000:]}")
            self.seen.append(line)
            if match := re.search(pattern, line):
                return match
        raise AssertionError(f"no line matched {pattern!r} within {timeout:.0f} s:\n{''.join(self.seen)[-3000:]}")

    def text(self, timeout: float = 60) -> str:
        """Everything the stream carried, once it has ended (the process exited)."""
        self._thread.join(timeout)
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.seen.append(line)
        return "".join(self.seen)


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Kill a process still running (a test's finally: a failed wait must not leave it training)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout)
