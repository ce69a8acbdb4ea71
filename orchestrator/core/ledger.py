"""The run ledger: one JSON line per event in `<run>/relay/ledger.jsonl`, written by the run's steward
alone, and the report `relay status` and the goodput figure are read from.

EventType below is the one list of events; the webhook (notify.py), W&B (tracking.py), `relay status`
(status.py) and the driver's display (display.py) each key their tables by it, and their unit tests check
that every event is either used or deliberately left out. Each event carries `time` (epoch seconds),
`type` and, where it has one, `step`.

Goodput is productive step time over wall time. An attempt's productive time is the time it spent on
steps the run kept: steps it trained past the point the next attempt resumed from were lost and
redone, so only their share of the attempt's training time counts.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from enum import StrEnum

from orchestrator.core.store import RunStorage

LEDGER = "relay/ledger.jsonl"
PROGRESS = "relay/progress.json"  # the steward's latest step and rate, rewritten every few seconds


class EventType(StrEnum):
    """Every kind of ledger event, and who records it (a string equal to the value reads as the member)."""

    RUN_STARTED = "run_started"  # the driver started a job on the run (world_size, config, hourly_cost)
    ATTEMPT = "attempt"  # a worker group began training (reason: an AttemptReason; steps_lost, time_to_resume)
    PROGRESS = "progress"  # the previous attempt's last step, written when the next one begins
    CHECKPOINT = "checkpoint"  # checkpoint-<step> committed to storage (uri, kept)
    EMERGENCY_CHECKPOINT = "emergency_checkpoint"  # saved after a preemption notice (seconds_from_notice)
    PREEMPTION_NOTICE = "preemption_notice"  # a node of the group will be reclaimed (nodes, deadline)
    RESIZE = "resize"  # the group's size changed (previous_world_size, world_size)
    WAITING_FOR_CAPACITY = "waiting_for_capacity"  # the steward: nodes of the group lost, no step since (nodes_lost, since)
    VALIDATION = "validation"  # a checkpoint's (or the base model's: benchmark) validation finished
    HUB_PUSHED = "hub_pushed"  # the Hub mirror committed a checkpoint
    EXPORTED = "exported"  # rank 0 wrote the final adapter (files)
    WARNING = "warning"  # a service's or a worker's trouble, for a person (message)
    STOP_REQUESTED = "stop_requested"  # Ctrl-C or SIGTERM at the driver: checkpoint, then stop
    COMPLETED = "completed"  # the run's end: trained to its last step (adapters, goodput)
    STOPPED = "stopped"  # the run's end: stopped on request after a committed checkpoint (signal)
    FAILED = "failed"  # the run's end: an error no restart cured (error)


ENDINGS = (EventType.COMPLETED, EventType.STOPPED, EventType.FAILED)


class AttemptReason(StrEnum):
    """Why a worker group is training (an attempt event's `reason`; policy.attempt_reason decides)."""

    FRESH = "fresh"  # a new run, from step 0
    RESUBMITTED = "resubmitted"  # a new job on a run with checkpoints
    PREEMPTION = "preemption"  # back after a preemption notice
    RESIZE = "resize"  # an elastic group grew back
    NODE_LOST = "node_lost"  # a node vanished without notice
    HEAD_LOST = "head_lost"  # the previous job's driver vanished without recording an end: the head was lost
    FAILURE = "failure"  # a worker failed


def parse_lines(data: bytes) -> tuple[list[dict], int]:
    """The ledger's events, and how many lines could not be read (a line cut off by a crash mid-write
    on a filesystem without atomic replace, or a stray edit): those are skipped, never fatal."""
    events, bad = [], 0
    for line in data.decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(event, dict) and "type" in event and isinstance(event.get("time"), (int, float)):
            events.append(event)
        else:
            bad += 1
    return events, bad


class Ledger:
    def __init__(self, storage: RunStorage):
        self.storage = storage
        data = storage.read_bytes(LEDGER)
        self.events, self.unreadable = parse_lines(data) if data else ([], 0)

    def record(self, kind: str, step: int | None = None, **fields) -> dict:
        """Append one event and write the ledger back whole (an S3 object cannot be appended to; the
        ledger stays small: a few hundred lines for a 300k-step run)."""
        event = {"time": fields.pop("time", time.time()), "type": kind, **({"step": step} if step is not None else {}), **fields}
        self.events.append(event)
        self.flush()
        return event

    def flush(self) -> None:
        self.storage.write(LEDGER, "".join(json.dumps(e, sort_keys=True) + "\n" for e in self.events).encode())


@dataclass
class Attempt:
    """One worker group's stretch of training, as the ledger's attempt and progress fields tell it."""

    started: float  # when the group began (after any model load)
    start_step: int
    reason: str  # an AttemptReason
    world_size: int
    last_step: int = 0
    last_time: float = 0.0
    steps_lost: int | None = None  # filled by the next attempt
    time_to_resume: float | None = None  # previous attempt's last step → this attempt's start


@dataclass
class Summary:
    run: str
    step: int = 0
    total_steps: int = 0
    steps_per_second: float | None = None
    eta_seconds: float | None = None
    wall_seconds: float = 0.0
    productive_seconds: float = 0.0
    goodput: float | None = None
    preemption_notices: int = 0
    emergency_checkpoints: list[dict] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    checkpoints: list[int] = field(default_factory=list)
    validations: list[dict] = field(default_factory=list)
    state: str = "unknown"  # not started | starting | running | waiting for capacity | completed | stopped | failed
    last_event: dict | None = None
    steps_lost: int = 0  # over all attempts


def summarize(run: str, events: list[dict], now: float | None = None, progress: dict | None = None) -> Summary:
    """Fold the ledger (and the steward's latest progress, newer than the ledger between attempts) into
    the figures `relay status`, the completed event and the webhook show: the one source of the run's
    state, step, steps lost and goodput."""
    s = Summary(run=run)
    attempts: list[Attempt] = []
    end: float | None = None
    waiting = False  # a waiting_for_capacity event since the group's last attempt
    for e in events:
        kind = e["type"]
        if kind in (EventType.RUN_STARTED, EventType.ATTEMPT):  # a new job or worker group: the run goes on
            s.state, end, waiting = "unknown", None, False
        waiting = kind == EventType.WAITING_FOR_CAPACITY or (waiting and kind not in ENDINGS)
        if kind == EventType.RUN_STARTED:
            s.total_steps = e.get("total_steps", s.total_steps)
        elif kind == EventType.ATTEMPT:
            attempt = Attempt(
                e["time"],
                e["step"],
                e.get("reason", AttemptReason.FRESH),
                e.get("world_size", 1),
                last_step=e["step"],
                last_time=e["time"],
            )
            if attempts:
                prev = attempts[-1]
                prev.steps_lost = e.get("steps_lost", max(prev.last_step - attempt.start_step, 0))
                attempt.time_to_resume = e.get("time_to_resume", attempt.started - prev.last_time)
            attempts.append(attempt)
            s.total_steps = e.get("total_steps", s.total_steps)
        elif kind == EventType.PROGRESS and attempts:
            attempts[-1].last_step, attempts[-1].last_time = e["step"], e["time"]
            s.steps_per_second = e.get("steps_per_second", s.steps_per_second)
        elif kind == EventType.CHECKPOINT:
            s.checkpoints.append(e["step"])
        elif kind == EventType.PREEMPTION_NOTICE:
            s.preemption_notices += 1
        elif kind == EventType.EMERGENCY_CHECKPOINT:
            s.emergency_checkpoints.append(e)
        elif kind == EventType.VALIDATION:
            s.validations.append(e)
        elif kind in ENDINGS:
            s.state, end = kind, e["time"]
            if attempts and "step" in e:
                attempts[-1].last_step, attempts[-1].last_time = e["step"], e["time"]
        if kind in (EventType.PROGRESS, EventType.CHECKPOINT, EventType.EMERGENCY_CHECKPOINT, *ENDINGS) and "step" in e:
            s.step = max(s.step, e["step"])
        elif kind == EventType.ATTEMPT:
            s.step = e["step"]  # a resume may go back to an earlier step
        s.last_event = e
    if not events:
        s.state = "not started"
        return s
    if progress and attempts and progress.get("time", 0) > attempts[-1].last_time and "step" in progress:
        # the steward writes progress every few seconds; the ledger only at an attempt's end
        if end is None or progress["time"] <= end:
            attempts[-1].last_step = max(attempts[-1].last_step, progress["step"])
            attempts[-1].last_time = progress["time"]
        if s.state == "unknown":
            s.step = max(s.step, progress["step"])
            s.total_steps = progress.get("total_steps") or s.total_steps
    if progress and progress.get("steps_per_second"):  # the steward's latest measured rate
        s.steps_per_second = progress["steps_per_second"]
    if s.state == "unknown":
        s.state = ("waiting for capacity" if waiting else "running") if attempts else "starting"
    start = events[0]["time"]
    s.wall_seconds = (end or now or time.time()) - start
    for a in attempts:
        kept = a.last_step - a.start_step - (a.steps_lost or 0)
        trained = a.last_step - a.start_step
        if trained > 0:
            s.productive_seconds += (a.last_time - a.started) * kept / trained
    s.attempts = attempts
    s.steps_lost = sum(a.steps_lost or 0 for a in attempts)
    s.goodput = s.productive_seconds / s.wall_seconds if s.wall_seconds > 0 else None
    if s.steps_per_second and s.total_steps and s.state == "running":
        s.eta_seconds = (s.total_steps - s.step) / s.steps_per_second
    return s
