"""One event vocabulary: the webhook, W&B, `relay status` and the driver's display each place every
EventType, either used or left out on purpose, and what they say of each event holds."""

from __future__ import annotations

import pytest

from orchestrator.ops import status
from orchestrator.run import display
from orchestrator.services import notify, tracking
from orchestrator.core.ledger import AttemptReason, EventType, Ledger
from orchestrator.core.store import RunStorage

T0 = 1_000.0
SAMPLES: dict[EventType, dict] = {  # each event with the fields its writer gives it
    EventType.RUN_STARTED: {"world_size": 2, "storage": "s3://b/run-1", "config": {"lora_type": "lycoris"}, "hourly_cost": 4.0},
    EventType.ATTEMPT: {
        "step": 50,
        "reason": "node_lost",
        "world_size": 2,
        "total_steps": 300,
        "steps_lost": 20,
        "time_to_resume": 30.0,
        "nodes_lost": ["n1"],
    },
    EventType.PROGRESS: {"step": 200, "steps_per_second": 2.5},
    EventType.CHECKPOINT: {"step": 200, "uri": "s3://b/run-1/checkpoint-200", "kept": [100, 200]},
    EventType.EMERGENCY_CHECKPOINT: {"step": 205, "committed": True, "seconds_from_notice": 12.5},
    EventType.PREEMPTION_NOTICE: {"step": 204, "nodes": ["n1"], "ranks": [1], "deadline": T0 + 200},
    EventType.RESIZE: {"step": 50, "world_size": 1, "previous_world_size": 2},
    EventType.WAITING_FOR_CAPACITY: {"step": 200, "nodes_lost": ["n1"], "since": T0 + 20},
    EventType.VALIDATION: {
        "step": 200,
        "benchmark": False,
        "location": "s3://b/run-1/relay/validation/checkpoint-200",
        "scores": {"adapter": {"mean": 25.0}},
        "images": 2,
        "seconds": 9.0,
    },
    EventType.HUB_PUSHED: {
        "step": 200,
        "root": 200,
        "added": ["checkpoints/checkpoint-200"],
        "deleted": [],
        "hub_steps": [100, 200],
    },
    EventType.EXPORTED: {"step": 300, "files": ["out/adapter.safetensors"], "node": "n0"},
    EventType.WARNING: {"message": "the Hub answered 429"},
    EventType.STOP_REQUESTED: {"step": 120},
    EventType.COMPLETED: {"step": 300, "adapters": "out/adapter.safetensors", "goodput": "90.0%"},
    EventType.STOPPED: {"step": 120, "signal": 2},
    EventType.FAILED: {"error": "RuntimeError: boom"},
}


def event(kind: EventType, t: float = 60.0, **changes) -> dict:
    return {"time": T0 + t, "type": kind.value, **SAMPLES[kind], **changes}


def test_every_event_has_a_sample() -> None:
    assert set(SAMPLES) == set(EventType)


@pytest.mark.parametrize(
    ("used", "left_out"),
    [
        (set(notify.SENT) | {EventType.ATTEMPT}, set(notify.NOT_SENT)),  # attempts: by reason, below
        (set(tracking.LOGGED), set(tracking.NOT_LOGGED)),
        (set(status.SHOWN), set(status.NOT_SHOWN)),
        (set(display.MILESTONES), set(display.NOT_SHOWN)),
    ],
    ids=["webhook", "wandb", "status", "display"],
)
def test_each_consumer_places_every_event_once(used: set, left_out: set) -> None:
    assert used | left_out == set(EventType)
    assert not used & left_out


# -- the webhook ------------------------------------------------------------------------------------


def test_attempts_are_sent_by_reason_and_a_fresh_one_is_not() -> None:
    assert set(notify.ATTEMPTS) | {AttemptReason.FRESH} == set(AttemptReason)
    assert notify.webhook_for(event(EventType.ATTEMPT, reason="fresh")) is None
    assert notify.webhook_for({"type": "attempt", "step": 0}) is None  # no reason: a fresh one
    assert notify.webhook_for(event(EventType.ATTEMPT)).type == notify.WebhookType.NODE_LOST


@pytest.mark.parametrize("kind", list(EventType), ids=str)
def test_what_each_event_sends(kind: EventType) -> None:
    sent = notify.webhook_for(event(kind))
    if kind in notify.NOT_SENT:
        assert sent is None
        return
    fields = {**{k: v for k, v in SAMPLES[kind].items() if k != "step"}, **notify.human_times(event(kind))}
    text = sent.template.format_map(notify._Fields(fields, step=SAMPLES[kind].get("step")))
    assert "?" not in text  # every field the template names is one the event's writer gives it
    assert sent.severity in notify.SEVERITIES


def test_a_preemption_notice_reads_as_a_clock_time_and_seconds_left() -> None:
    import time

    notice = event(EventType.PREEMPTION_NOTICE, t=80.0)  # the deadline is 120 s after the notice
    fields = notify.human_times(notice)
    assert fields == {"deadline_utc": time.strftime("%H:%M:%S UTC", time.gmtime(T0 + 200)), "seconds_left": 120}


def test_every_webhook_type_is_sent() -> None:
    from_tables = {s.type for s in [*notify.SENT.values(), *notify.ATTEMPTS.values()]}
    assert from_tables | {notify.WebhookType.VALIDATION} == set(notify.WebhookType)  # validation: by the steward


# -- W&B --------------------------------------------------------------------------------------------


def test_wandb_rows_take_their_prefix_from_the_event() -> None:
    row = tracking.Tracker._row(EventType.PROGRESS, 7, {"loss": 0.5, "custom/x": 1.0}, None)
    assert row == {"step": 7, "train/loss": 0.5, "custom/x": 1.0}
    row = tracking.Tracker._row(EventType.VALIDATION, 7, [], {"clip_score": 0.3})
    assert row == {"step": 7, "validation/clip_score": 0.3}


# -- relay status -----------------------------------------------------------------------------------


def record(ledger: Ledger, e: dict) -> None:
    e = dict(e)
    ledger.record(e.pop("type"), e.pop("step", None), **e)


def report(storage: RunStorage) -> dict:
    shown = status.gather(storage, hub=False, now=T0 + 100)
    shown.pop("last_event")
    return shown


@pytest.mark.parametrize("kind", list(EventType), ids=str)
def test_status_shows_what_it_says_it_shows(tmp_path, kind: EventType) -> None:
    storage = RunStorage(str(tmp_path / "runs"), "run-1")
    ledger = Ledger(storage)
    for e in [
        {"time": T0, "type": "run_started", "total_steps": 300},
        {"time": T0 + 5, "type": "attempt", "step": 0, "reason": "fresh", "world_size": 2, "total_steps": 300},
        {"time": T0 + 30, "type": "checkpoint", "step": 100},
    ]:
        record(ledger, e)
    before = report(storage)
    record(ledger, event(kind))
    assert (report(storage) != before) == (kind in status.SHOWN), status.SHOWN.get(kind) or status.NOT_SHOWN[kind]


# -- the driver's display ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(EventType), ids=str)
def test_the_display_shows_its_milestones(kind: EventType) -> None:
    line = display.milestone(event(kind), where=lambda rel: f"s3://b/run-1/{rel}")
    if kind in display.NOT_SHOWN:
        assert line is None
    else:
        level, text = line
        assert level in ("info", "warning", "error") and text and "None" not in text


def test_the_display_words_a_restart_by_its_reason() -> None:
    where = str
    assert display.milestone(event(EventType.ATTEMPT), where) == (
        "error",
        "resumed at step 50 (a node was lost; 20 step(s) lost; back in 30 s)",
    )
    assert display.milestone(event(EventType.ATTEMPT, reason="preemption", steps_lost=0), where) == (
        "warning",
        "resumed at step 50 (preempted; back in 30 s)",
    )
    assert display.milestone(event(EventType.ATTEMPT, reason="fresh"), where) is None
    assert set(display.RESUMED_BECAUSE) | {AttemptReason.FRESH} == set(AttemptReason)
