"""What the run says of each event, in one place: the webhook's message (its type, severity and
sentence) and the driver's milestone line, side by side per event; and the shapes the webhook backends
receive (raw JSON, Discord). Pure: no threads, no network. Delivery is notify.py's; the driver's
display (run/display.py) prints these lines.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from orchestrator.core.ledger import AttemptReason, EventType
from orchestrator.core.policy import UNPLANNED
from relay_train.artifacts import BENCHMARK, GRID, checkpoint_name, validation_folder

# -- the webhook's sentences ----------------------------------------------------------------------------


class WebhookType(StrEnum):
    """The payload's "type", which receivers filter on: the ledger's name where the two agree, and the
    webhook's own where a receiver wants it finer or coarser (a committed checkpoint of either kind, an
    attempt by its reason, a failed run)."""

    RUN_STARTED = EventType.RUN_STARTED.value
    RESUMED = "resumed"  # a worker group back after a resubmission, a preemption or a resize
    CHECKPOINT_COMMITTED = "checkpoint_committed"  # a checkpoint or an emergency checkpoint
    HUB_PUSHED = EventType.HUB_PUSHED.value
    VALIDATION = EventType.VALIDATION.value
    PREEMPTION_NOTICE = EventType.PREEMPTION_NOTICE.value
    NODE_LOST = AttemptReason.NODE_LOST.value  # a worker group ended because a node vanished without notice
    HEAD_LOST = AttemptReason.HEAD_LOST.value  # the job ended with its head node; a resubmission resumed it
    RESTART = "restart"  # a worker group ended on an error and Ray restarted it
    RESIZE = EventType.RESIZE.value
    WARNING = EventType.WARNING.value
    FAILURE = "failure"  # the run ended failed
    STOPPED = EventType.STOPPED.value  # the run stopped on request, checkpoint committed
    COMPLETED = EventType.COMPLETED.value


@dataclass(frozen=True)
class Send:
    """How a ledger event goes to the webhooks: the payload's type, its severity, and its message, a
    str.format_map template over the event's step and fields (a field the event lacks reads "?")."""

    type: WebhookType
    severity: str
    template: str


def human_times(event: dict[str, Any]) -> dict[str, Any]:
    """A notice's deadline and a wait's start as a person reads them: UTC clock time and seconds left."""
    out: dict[str, Any] = {}
    if isinstance(event.get("deadline"), (int, float)):
        out["deadline_utc"] = time.strftime("%H:%M:%S UTC", time.gmtime(event["deadline"]))
        out["seconds_left"] = max(0, round(event["deadline"] - event.get("time", time.time())))
    if isinstance(event.get("since"), (int, float)):
        out["since_utc"] = time.strftime("%H:%M:%S UTC", time.gmtime(event["since"]))
    return out


def webhook_for(event: dict[str, Any]) -> Send | None:
    """How a ledger event is sent, or None for one that is not (see NOT_SENT, and a fresh attempt)."""
    if event.get("type") == EventType.ATTEMPT:
        return ATTEMPTS.get(event.get("reason", AttemptReason.FRESH))
    return SENT.get(event.get("type"))


class _Fields(dict):
    """A message's fields for str.format_map: one the event lacks reads "?" rather than failing."""

    def __missing__(self, key: str) -> str:
        return "?"


SEVERITIES = ("critical", "error", "warning", "info", "debug")
"""Most severe first; a backend's log_level sends its level and everything above it."""

DISCORD_TEXT_LIMIT = 2000  # characters in a message's content
DISCORD_FILES_PER_MESSAGE = 10


def rank(severity: str) -> int:
    return SEVERITIES.index(severity) if severity in SEVERITIES else SEVERITIES.index("info")


Where = Callable[[str], str]  # names a file in the run's storage, given its path there
Line = tuple[str, str]  # (level, text)
Shown = Callable[[dict, int | None, Where], Line | None]  # the driver's line for (event, step, where)


def _checkpoint(event: dict, step: int | None, where: Where) -> Line:
    return "info", f"checkpoint {step} committed: {event.get('uri', where(checkpoint_name(step)))}"


def _validation(event: dict, step: int | None, where: Where) -> Line:
    if event.get("benchmark"):
        return "info", f"validation of the base model done: {where(f'{validation_folder(BENCHMARK)}/{GRID}')}"
    scores = event.get("scores") or {}
    shown = "; ".join(f"{v} CLIP {s['mean']:.2f}" for v, s in scores.items() if isinstance(s, dict) and "mean" in s)
    grid = f"{event['location']}/{GRID}" if event.get("location") else where(f"{validation_folder(step)}/{GRID}")
    return "info", f"validation at step {step} done: {grid}" + (f" ({shown})" if shown else "")


def _emergency_checkpoint(event: dict, step: int | None, where: Where) -> Line:
    state = "committed" if event.get("committed", True) else "NOT committed"
    secs = event.get("seconds_from_notice")
    return "warning", f"emergency checkpoint {step} {state}" + (f" {secs:.1f} s after the notice" if secs else "")


def _attempt(event: dict, step: int | None, where: Where) -> Line | None:
    reason = event.get("reason", AttemptReason.FRESH)
    if reason == AttemptReason.FRESH:
        return None
    lost = event.get("steps_lost")
    level = "error" if reason in UNPLANNED else "warning"
    return level, (
        f"resumed at step {step} ({RESUMED_BECAUSE.get(reason, reason)}"
        + (f"; {lost} step(s) lost" if lost else "")
        + (f"; back in {event['time_to_resume']:.0f} s" if event.get("time_to_resume") else "")
        + ")"
    )


# -- the table: each event, what the webhook sends and what the driver shows --------------------------


@dataclass(frozen=True)
class Said:
    """What the run says of one ledger event: to the webhooks (None: not sent, NOT_SENT says why) and as
    the driver's milestone line (None: not shown, NOT_SHOWN says why)."""

    webhook: Send | None
    line: Shown | None


_BACK = "{steps_lost} step(s) lost; back at step {step} after {time_to_resume} s"
EVENTS: dict[EventType, Said] = {
    EventType.RUN_STARTED: Said(Send(WebhookType.RUN_STARTED, "info", "run started"), None),
    EventType.ATTEMPT: Said(None, _attempt),  # the webhook's by reason: ATTEMPTS
    EventType.CHECKPOINT: Said(Send(WebhookType.CHECKPOINT_COMMITTED, "info", "checkpoint {step} committed: {uri}"), _checkpoint),
    EventType.EMERGENCY_CHECKPOINT: Said(
        Send(WebhookType.CHECKPOINT_COMMITTED, "warning", "emergency checkpoint at step {step}"), _emergency_checkpoint
    ),
    EventType.HUB_PUSHED: Said(
        Send(WebhookType.HUB_PUSHED, "info", "checkpoint {step} pushed to the Hub"),
        lambda e, step, where: ("info", f"checkpoint {step} pushed to the Hub"),
    ),
    EventType.VALIDATION: Said(None, _validation),
    EventType.PREEMPTION_NOTICE: Said(
        Send(
            WebhookType.PREEMPTION_NOTICE,
            "warning",
            "preemption notice at step {step}: the node goes at {deadline_utc} ({seconds_left} s left); checkpointing now",
        ),
        lambda e, step, where: ("warning", f"preemption notice at step {step}: checkpointing now"),
    ),
    EventType.RESIZE: Said(
        Send(WebhookType.RESIZE, "info", "worker group resized from {previous_world_size} to {world_size} worker(s)"),
        lambda e, step, where: ("warning", f"worker group resized: {e.get('previous_world_size')} → {e.get('world_size')}"),
    ),
    EventType.WAITING_FOR_CAPACITY: Said(
        Send(WebhookType.NODE_LOST, "error", "node(s) lost at step {step}: no step since {since_utc}; waiting for capacity"),
        lambda e, step, where: (
            "error",
            f"{len(e.get('nodes_lost') or [])} node(s) lost at step {step}: waiting for capacity to resume",
        ),
    ),
    EventType.WARNING: Said(
        Send(WebhookType.WARNING, "warning", "{message}"), lambda e, step, where: ("warning", str(e.get("message", "")))
    ),
    EventType.STOP_REQUESTED: Said(
        None, lambda e, step, where: ("warning", "stop requested: checkpointing at the next step boundary")
    ),
    EventType.FAILED: Said(
        Send(WebhookType.FAILURE, "error", "run failed: {error}"),
        lambda e, step, where: ("error", f"failed: {e.get('error', '')}"),
    ),
    EventType.STOPPED: Said(
        Send(WebhookType.STOPPED, "warning", "run stopped on request at step {step}; the same command resumes it"),
        lambda e, step, where: ("warning", f"stopped at step {step}; run the same command to resume"),
    ),
    EventType.COMPLETED: Said(
        Send(WebhookType.COMPLETED, "info", "run completed at step {step}: {adapters}; goodput {goodput}"),
        lambda e, step, where: (
            "info",
            f"completed at step {step}; adapter: {e.get('adapters', '-')}; goodput {e.get('goodput', '-')}",
        ),
    ),
}
RESUMED: dict[AttemptReason, tuple[Send, str]] = {
    # an attempt is sent by its reason: a fresh one says nothing (run_started did), an unplanned one is an alert
    AttemptReason.RESUBMITTED: (Send(WebhookType.RESUMED, "info", "resumed from step {step} (job resubmitted)"), "resubmitted"),
    AttemptReason.PREEMPTION: (Send(WebhookType.RESUMED, "info", "resumed from step {step} (preemption)"), "preempted"),
    AttemptReason.RESIZE: (
        Send(WebhookType.RESUMED, "info", "resumed from step {step} (resize, {world_size} worker(s))"),
        "resized",
    ),
    AttemptReason.NODE_LOST: (
        Send(WebhookType.NODE_LOST, "error", "a node was lost without notice: " + _BACK),
        "a node was lost",
    ),
    AttemptReason.HEAD_LOST: (
        Send(WebhookType.HEAD_LOST, "error", "the head node was lost and the job resubmitted: " + _BACK),
        "the head was lost",
    ),
    AttemptReason.FAILURE: (
        Send(WebhookType.RESTART, "error", "the worker group failed and was restarted: " + _BACK),
        "a worker failed",
    ),
}
NOT_SENT: dict[EventType, str] = {  # and why a receiver does not hear them
    EventType.PROGRESS: "bookkeeping before the next attempt, which is the news",
    EventType.VALIDATION: "the steward sends it itself, with its images (steward.build_services)",
    EventType.EXPORTED: "the completed message names the adapters",
    EventType.STOP_REQUESTED: "the stopped message follows, once the checkpoint is committed",
}
NOT_SHOWN: dict[EventType, str] = {  # and why a person at the driver does not see them
    EventType.RUN_STARTED: "the driver logs the run's start itself (launch.run_on_ray)",
    EventType.PROGRESS: "the progress line shows it",
    EventType.EXPORTED: "the completed line names the adapter",
}
SENT: dict[EventType, Send] = {kind: said.webhook for kind, said in EVENTS.items() if said.webhook}
MILESTONES: dict[EventType, Shown] = {kind: said.line for kind, said in EVENTS.items() if said.line}
ATTEMPTS: dict[AttemptReason, Send] = {reason: send for reason, (send, _) in RESUMED.items()}
RESUMED_BECAUSE: dict[AttemptReason, str] = {reason: why for reason, (_, why) in RESUMED.items()}


def milestone(event: dict, where: Where) -> Line | None:
    """(level, line) for a ledger event a person wants to see, or None. `where(rel)` names a file in the
    run's storage. Pure: tests feed it events."""
    shown = MILESTONES.get(event.get("type"))
    return shown(event, event.get("step"), where) if shown else None


# -- the backends' shapes ---------------------------------------------------------------------------------


@dataclass(eq=False)  # queues find and remove a message by identity
class Message:
    """One event on its way to one backend."""

    type: str
    severity: str
    step: int | None
    message: str
    fields: dict[str, Any]
    images: list[tuple[str, bytes]]
    timestamp: float
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    seq: int = 0  # order among events of one Notifier with the same millisecond timestamp
    parts_done: int = 0  # Discord requests already delivered (images go 10 to a request)
    spooled: str | None = None  # its file under the spool, once written

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["images"] = [{"name": n, "png_base64": base64.b64encode(b).decode()} for n, b in self.images]
        data.pop("spooled")
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], spooled: str) -> Message:
        images = [(i["name"], base64.b64decode(i["png_base64"])) for i in data.pop("images", [])]
        return cls(**data, images=images, spooled=spooled)


def raw_payload(message: Message, run: str) -> dict[str, Any]:
    """The raw webhook's JSON: the event's fields, then the fixed keys (which win over a field's name)."""
    return {
        **message.fields,
        "type": message.type,
        "run": run,
        "step": message.step,
        "severity": message.severity,
        "timestamp": message.timestamp,
        "message": message.message,
        "images": [{"name": n, "png_base64": base64.b64encode(b).decode()} for n, b in message.images],
    }


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return value if isinstance(value, str) else json.dumps(value, default=str)


def discord_text(message: Message, run: str, prefix: str, limit: int = DISCORD_TEXT_LIMIT) -> str:
    """prefix + run + step + the message, then the fields as lines, within Discord's limit."""
    step = f" · step {message.step}" if message.step is not None else ""
    lines = [
        f"`({prefix})` **{run}**{step} · {message.type}"
        + (f" [{message.severity}]" if rank(message.severity) < rank("info") else ""),
        message.message,
    ]
    lines += [f"{k}: {_show(v)}" for k, v in message.fields.items()]
    text = "\n".join(line for line in lines if line)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def discord_requests(message: Message, run: str, prefix: str) -> list[dict[str, Any]]:
    """requests.post keyword arguments, one per Discord message: the text with the first 10 images,
    then 10 more images per message. Images travel as multipart (payload_json + files[n])."""
    text = discord_text(message, run, prefix)
    quiet = {"parse": []}  # no @everyone pings from a caption
    if not message.images:
        return [{"json": {"content": text, "allowed_mentions": quiet}}]
    out = []
    chunks = range(0, len(message.images), DISCORD_FILES_PER_MESSAGE)
    for number, start in enumerate(chunks):
        chunk = message.images[start : start + DISCORD_FILES_PER_MESSAGE]
        content = (
            text
            if number == 0
            else discord_text(
                Message(
                    message.type,
                    message.severity,
                    message.step,
                    f"images {start + 1}-{start + len(chunk)} of {len(message.images)}",
                    {},
                    [],
                    0,
                ),
                run,
                prefix,
            )
        )
        payload = {
            "content": content,
            "allowed_mentions": quiet,
            "attachments": [{"id": i, "filename": name} for i, (name, _) in enumerate(chunk)],
        }
        files = [(f"files[{i}]", (name, data, "image/png")) for i, (name, data) in enumerate(chunk)]
        out.append({"data": {"payload_json": json.dumps(payload)}, "files": files})
    return out


def _png_name(name: str, index: int) -> str:
    clean = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80] or f"image{index}"
    return clean if clean.lower().endswith(".png") else clean + ".png"
