"""The end of a run is bounded: a webhook that never answers holds the steward's close for about 30 s,
not the 300 s the other services may take; what it could not send waits in the spool for the next run."""

from __future__ import annotations

import time

from orchestrator.services.notify import Notifier
from orchestrator.run.steward import Steward
from orchestrator.core.store import RunStorage
from relay_train.config.files import WebhookConfig


def test_a_dead_webhook_holds_the_end_of_a_run_about_30_seconds(webhook_receiver, tmp_path) -> None:
    storage = RunStorage(str(tmp_path), "run")
    webhook_receiver.refuse()  # the receiver is down for the whole run
    hook = WebhookConfig(webhook_type="raw", callback_url=webhook_receiver.url("/relay"))
    notifier = Notifier([hook], "run", spool=storage)
    assert notifier.close_seconds <= 30
    steward = Steward(storage, poll_seconds=3600, services=[notifier])
    steward.start()  # starts the notifier too
    steward.run_started(total_steps=10)
    steward.attempt(0, world_size=1, total_steps=10, resumed=False)
    start = time.monotonic()
    steward.close({"type": "completed", "step": 10}, timeout=300)
    waited = time.monotonic() - start
    assert waited < notifier.close_seconds + 10, f"close took {waited:.0f} s"
    spooled = storage.listdir("relay/webhook-spool")
    assert spooled, "undelivered messages must be spooled for the next run"
    assert not webhook_receiver.requests
    webhook_receiver.up()
    # the next run's notifier sends the spool first
    with Notifier([hook], "run", spool=storage) as again:
        deadline = time.monotonic() + 60
        while again.pending() and time.monotonic() < deadline:
            time.sleep(0.2)
    kinds = [r.json["type"] for r in webhook_receiver.requests if r.json]
    assert "run_started" in kinds and "completed" in kinds, kinds
