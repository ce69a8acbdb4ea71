"""`relay train`'s signal handling, in this process: a signal that arrives after the loop returned (the
second of a double Ctrl-C on a loaded machine) must not turn a clean stop into a death by SIGINT."""

from __future__ import annotations

import os
import signal
import time

import pytest

from relay_train.cli import StopOnSignal


@pytest.fixture
def handlers():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def _deliver(sig: int) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(0.05)  # Python runs the handler at the next bytecode boundary of the main thread


def test_a_second_signal_mid_run_aborts(handlers):
    stop = StopOnSignal()
    _deliver(signal.SIGINT)
    assert stop(1) and stop.signum == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
        _deliver(signal.SIGINT)


def test_a_signal_after_the_loop_returned_is_ignored(handlers):
    stop = StopOnSignal()
    _deliver(signal.SIGINT)
    stop.finished()
    _deliver(signal.SIGINT)  # before the fix: KeyboardInterrupt outside main's handlers, exit by SIGINT
    _deliver(signal.SIGTERM)
    assert stop.signum == signal.SIGINT
    # ignored by the OS, not by a Python handler: the interpreter's shutdown restores the default action of
    # Python handlers (exit by SIGINT), but leaves SIG_IGN alone
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN == signal.getsignal(signal.SIGTERM)
