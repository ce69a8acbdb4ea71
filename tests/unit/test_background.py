"""The one background worker (orchestrator/core/background.py): order, bounded drop, retry by the
failure decision, give-up, and a close bounded in time."""

from __future__ import annotations

import threading
import time

from orchestrator.core.background import Background
from orchestrator.core.failure import Retries


def test_items_are_handled_in_order_and_close_drains_them():
    seen: list[int] = []
    worker = Background("t", seen.append, max_queue=10)
    for n in range(5):
        assert worker.put(n)
    assert worker.close(5.0) and seen == [0, 1, 2, 3, 4]  # never started: close handles what is queued
    assert not worker.put(9) and worker.stats["handled"] == 5


def test_a_full_queue_drops_what_the_policy_picks():
    dropped: list[str] = []
    gate = threading.Event()
    worker = Background(
        "t", lambda item: gate.wait(5), max_queue=3, drop=lambda items: items.index("low") if "low" in items else 0
    )
    worker.on_drop = dropped.append
    for item in ("a", "low", "b", "c"):
        worker.put(item)
    assert dropped == ["low"] and worker.items() == ["a", "b", "c"] and worker.stats["dropped"] == 1
    gate.set()
    assert worker.start().close(5.0)


def test_a_failure_is_retried_as_decided_then_given_up():
    tries: list[str] = []
    troubles: list[int] = []
    gave_up: list[tuple[str, str]] = []

    def handle(item: str) -> None:
        tries.append(item)
        if item == "bad" or len(tries) < 3:
            raise ConnectionError("refused")

    worker = Background(
        "t",
        handle,
        max_queue=10,
        retries=Retries(limit=2, base=0.01, cap=0.02),
        on_give_up=lambda item, decision: gave_up.append((item, decision.reason)),
        on_trouble=lambda: troubles.append(1),
    ).start()
    worker.put("ok")
    worker.put("bad")
    deadline = time.monotonic() + 5
    while (worker.stats["handled"] + worker.stats["given_up"]) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tries[:3] == ["ok", "ok", "ok"] and worker.stats["handled"] == 1  # two retries, then through
    assert tries[3:] == ["bad"] * 3 and gave_up == [("bad", "ConnectionError: refused; gave up after 3 tries")]
    assert worker.stats["retries"] == 4 and len(troubles) >= 4
    assert worker.close(1.0)


def test_close_stops_at_its_deadline_with_the_rest_still_queued():
    worker = Background("t", lambda item: time.sleep(0.2), max_queue=100).start()
    for n in range(50):
        worker.put(n)
    start = time.monotonic()
    assert not worker.close(0.5)
    assert time.monotonic() - start < 2.0 and 0 < worker.pending() < 50
