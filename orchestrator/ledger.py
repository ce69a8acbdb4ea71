"""The run ledger: one JSON line per event in `<run>/relay/ledger.jsonl`, written by the run's steward
alone, and the report `relay status` and the goodput figure are read from.

Events: run_started, attempt (a worker group began training: fresh, resumed, restarted), checkpoint
(committed to storage), emergency_checkpoint, preemption_notice, validation, hub, warning, completed,
failed. Each carries `time` (epoch seconds), `type` and, where it has one, `step`.

Goodput is productive step time over wall time. An attempt's productive time is the time it spent on
steps the run kept: steps it trained past the point the next attempt resumed from were lost and
redone, so only their share of the attempt's training time counts.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from orchestrator.store import RunStorage

LEDGER = "relay/ledger.jsonl"


class Ledger:
    def __init__(self, storage: RunStorage):
        self.storage = storage
        data = storage.read_bytes(LEDGER)
        self.events: list[dict] = [json.loads(line) for line in data.decode().splitlines() if line.strip()] if data else []

    def record(self, kind: str, step: int | None = None, **fields) -> dict:
        """Append one event and write the ledger back whole (an S3 object cannot be appended to; the
        ledger stays small: a few hundred lines for a 300k-step run)."""
        event = {"time": fields.pop("time", time.time()), "type": kind, **({"step": step} if step is not None else {}),
                 **fields}
        self.events.append(event)
        self.flush()
        return event

    def flush(self) -> None:
        self.storage.write_bytes(LEDGER, "".join(json.dumps(e, sort_keys=True) + "\n" for e in self.events).encode())


@dataclass
class Attempt:
    """One worker group's stretch of training, as the ledger's attempt and progress fields tell it."""

    started: float  # when the group began (after any model load)
    start_step: int
    reason: str  # fresh | resumed (new job on an existing run) | preemption | failure
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
    state: str = "unknown"  # running | completed | failed
    last_event: dict | None = None


def summarize(run: str, events: list[dict], now: float | None = None) -> Summary:
    """Fold the ledger into the figures `relay status` shows."""
    s = Summary(run=run)
    attempts: list[Attempt] = []
    end: float | None = None
    for e in events:
        kind = e["type"]
        if kind == "run_started":
            s.total_steps = e.get("total_steps", s.total_steps)
        elif kind == "attempt":
            attempt = Attempt(e["time"], e["step"], e.get("reason", "fresh"), e.get("world_size", 1),
                              last_step=e["step"], last_time=e["time"])
            if attempts:
                prev = attempts[-1]
                prev.steps_lost = e.get("steps_lost", max(prev.last_step - attempt.start_step, 0))
                attempt.time_to_resume = attempt.started - prev.last_time
            attempts.append(attempt)
            s.total_steps = e.get("total_steps", s.total_steps)
        elif kind == "progress" and attempts:
            attempts[-1].last_step, attempts[-1].last_time = e["step"], e["time"]
            s.steps_per_second = e.get("steps_per_second", s.steps_per_second)
        elif kind == "checkpoint":
            s.checkpoints.append(e["step"])
        elif kind == "preemption_notice":
            s.preemption_notices += 1
        elif kind == "emergency_checkpoint":
            s.emergency_checkpoints.append(e)
        elif kind == "validation":
            s.validations.append(e)
        elif kind in ("completed", "failed"):
            s.state, end = kind, e["time"]
            if attempts and "step" in e:
                attempts[-1].last_step, attempts[-1].last_time = e["step"], e["time"]
        if kind in ("progress", "checkpoint", "emergency_checkpoint", "completed"):
            s.step = max(s.step, e["step"])
        elif kind == "attempt":
            s.step = e["step"]  # a resume may go back to an earlier step
        s.last_event = e
    if not events:
        return s
    if s.state == "unknown":
        s.state = "running"
    start = events[0]["time"]
    s.wall_seconds = (end or now or time.time()) - start
    for a in attempts:
        kept = a.last_step - a.start_step - (a.steps_lost or 0)
        trained = a.last_step - a.start_step
        if trained > 0:
            s.productive_seconds += (a.last_time - a.started) * kept / trained
    s.attempts = attempts
    s.goodput = s.productive_seconds / s.wall_seconds if s.wall_seconds > 0 else None
    if s.steps_per_second and s.total_steps and s.state == "running":
        s.eta_seconds = (s.total_steps - s.step) / s.steps_per_second
    return s
