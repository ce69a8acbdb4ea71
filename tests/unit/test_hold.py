"""relay_train.hold: the loop waits at the step the file names, goes on when it names a later one, runs
free when the file is gone, and never looks when the variable is unset."""

from __future__ import annotations

import threading
import time

from relay_train.hold import HOLD_ENV, Hold


def test_unset_means_no_hold():
    assert Hold.from_env({}) is None


def test_the_loop_waits_at_the_named_step_until_a_later_one_or_no_file(tmp_path):
    path = tmp_path / "hold"
    path.write_text("3")
    hold = Hold.from_env({HOLD_ENV: str(path)})
    hold.wait(2)  # step 3 may be trained: no wait
    reached = []

    def loop():
        for step in range(3, 6):
            hold.wait(step)
            reached.append(step + 1)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    time.sleep(0.3)
    assert reached == []  # held before step 4
    path.write_text("4")
    deadline = time.monotonic() + 5
    while reached != [4] and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)
    assert reached == [4]  # step 4 trained, held again before step 5
    path.write_text("")  # half-written: still held
    time.sleep(0.2)
    assert reached == [4]
    path.unlink()
    thread.join(timeout=5)
    assert reached == [4, 5, 6]
