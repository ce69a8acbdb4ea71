"""The notifier's pure parts: retry decisions, which message a full queue drops, and message shapes."""

from __future__ import annotations

import base64
import json
import random

from orchestrator.services.notify import (
    DISCORD_TEXT_LIMIT,
    Message,
    RetryPolicy,
    discord_requests,
    discord_text,
    drop_choice,
    raw_payload,
)
from orchestrator.core.policy import retry_delay

POLICY = RetryPolicy(timeout=1.0, base=1.0, cap=8.0)


def notify_delay(status: int | None, retry_after: float | None, attempt: int, rng: random.Random | None = None) -> float | None:
    """As the delivery thread asks: the answer's status and wait, POLICY's backoff, jittered."""
    return retry_delay(attempt, POLICY.base, POLICY.cap, status=status, retry_after=retry_after, jitter=(rng or random).random())


def message(**kw) -> Message:
    base = dict(
        type="validation",
        severity="info",
        step=5000,
        message="validation done",
        fields={"clip_score": 0.312},
        images=[],
        timestamp=1.5,
    )
    return Message(**(base | kw))


def test_retry_delay_backs_off_and_caps() -> None:
    rng = random.Random(0)
    delays = [notify_delay(None, None, attempt, rng) for attempt in range(1, 8)]
    for attempt, delay in enumerate(delays, start=1):
        ceiling = min(8.0, 2 ** (attempt - 1))
        assert ceiling / 2 <= delay <= ceiling  # jittered within the upper half
    assert max(delays) <= 8.0


def test_retry_delay_by_status() -> None:
    assert notify_delay(429, 2.5, 1) == 2.5  # Discord's retry_after wins over backoff
    assert 0.5 <= notify_delay(429, None, 1) <= 1.0
    assert notify_delay(503, None, 1) is not None and notify_delay(408, None, 1) is not None
    assert notify_delay(400, None, 1) is None and notify_delay(404, None, 1) is None


def test_drop_choice_takes_the_oldest_least_severe() -> None:
    assert drop_choice(["info", "debug", "critical", "debug"]) == 1
    assert drop_choice(["error", "warning", "warning", "info"]) == 3  # the new message itself
    assert drop_choice(["critical", "critical"]) == 0


def test_raw_payload_keys_and_images() -> None:
    shot = b"\x89PNG fake"
    payload = raw_payload(message(fields={"clip_score": 0.3, "type": "spoof"}, images=[("a.png", shot)]), "run-1")
    assert payload["type"] == "validation" and payload["run"] == "run-1" and payload["step"] == 5000
    assert payload["severity"] == "info" and payload["timestamp"] == 1.5 and payload["clip_score"] == 0.3
    assert payload["images"] == [{"name": "a.png", "png_base64": base64.b64encode(shot).decode()}]
    json.dumps(payload)


def test_discord_text_fits_the_limit() -> None:
    text = discord_text(message(message="x" * 5000), "run-1", "proj")
    assert len(text) == DISCORD_TEXT_LIMIT and text.startswith("`(proj)` **run-1** · step 5000 · validation")
    assert "[error]" in discord_text(message(severity="error"), "r", "p")


def test_discord_images_go_ten_to_a_message() -> None:
    images = [(f"img{i}.png", bytes([i])) for i in range(23)]
    calls = discord_requests(message(images=images), "run-1", "proj")
    assert [len(c["files"]) for c in calls] == [10, 10, 3]
    first = json.loads(calls[0]["data"]["payload_json"])
    assert "validation done" in first["content"] and first["attachments"][0] == {"id": 0, "filename": "img0.png"}
    assert calls[2]["files"][2] == ("files[2]", ("img22.png", bytes([22]), "image/png"))
    assert "images 21-23 of 23" in json.loads(calls[2]["data"]["payload_json"])["content"]
    assert discord_requests(message(), "run-1", "proj")[0]["json"]["allowed_mentions"] == {"parse": []}
