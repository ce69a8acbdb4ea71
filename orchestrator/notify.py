"""Webhook notifications (Discord or raw JSON) that never slow or stop training.

`Notifier.event(...)` only appends to an in-memory queue and returns (microseconds; it never raises).
Each backend has its own queue and delivery thread, so a dead Discord never holds up a raw receiver:
the thread posts with a timeout, retries with exponential backoff, honours Discord's 429 `retry_after`
and drops a message only when the receiver rejects it outright (a 4xx other than 408/425/429).

The queue is bounded; when full, the oldest message of the lowest severity goes (counted and logged).

Messages survive a dead process through a spool in the run's storage (`relay/webhook-spool/`):
- while a backend answers, nothing is written (a message is in memory for the milliseconds it takes);
- the first failed attempt writes every queued message to the spool, and so does each later message
  while the backend stays in trouble; a delivered message's spool file is deleted;
- `close(timeout)` delivers what it can, then spools the rest;
- the next Notifier with the same spool sends the spooled messages first, oldest first.
Delivery is at least once: a message delivered just before a crash, whose spool file was not yet
deleted, is sent again after the restart.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import logging
import random
import threading
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

import requests
from pydantic import SecretStr

from orchestrator.ledger import AttemptReason, EventType
from orchestrator.policy import retry_after, retry_delay
from orchestrator.redact import Redactor, installed, url_parts
from orchestrator.store import RunStorage
from relay_train.config.files import WebhookConfig

log = logging.getLogger(__name__)

# -- what each ledger event sends ------------------------------------------------------------------------


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


_BACK = "{steps_lost} step(s) lost; back at step {step} after {time_to_resume} s"
SENT: dict[EventType, Send] = {
    EventType.RUN_STARTED: Send(WebhookType.RUN_STARTED, "info", "run started"),
    EventType.CHECKPOINT: Send(WebhookType.CHECKPOINT_COMMITTED, "info", "checkpoint {step} committed: {uri}"),
    EventType.EMERGENCY_CHECKPOINT: Send(WebhookType.CHECKPOINT_COMMITTED, "warning", "emergency checkpoint at step {step}"),
    EventType.HUB_PUSHED: Send(WebhookType.HUB_PUSHED, "info", "checkpoint {step} pushed to the Hub"),
    EventType.PREEMPTION_NOTICE: Send(WebhookType.PREEMPTION_NOTICE, "warning", "preemption notice"),
    EventType.RESIZE: Send(
        WebhookType.RESIZE, "info", "worker group resized from {previous_world_size} to {world_size} worker(s)"
    ),
    EventType.WARNING: Send(WebhookType.WARNING, "warning", "{message}"),
    EventType.FAILED: Send(WebhookType.FAILURE, "error", "run failed: {error}"),
    EventType.STOPPED: Send(WebhookType.STOPPED, "warning", "run stopped on request at step {step}; the same command resumes it"),
    EventType.COMPLETED: Send(WebhookType.COMPLETED, "info", "run completed at step {step}: {adapters}; goodput {goodput}"),
}
ATTEMPTS: dict[AttemptReason, Send] = {
    # an attempt is sent by its reason: a fresh one says nothing (run_started did), an unplanned one is an alert
    AttemptReason.RESUBMITTED: Send(WebhookType.RESUMED, "info", "resumed from step {step} (job resubmitted)"),
    AttemptReason.PREEMPTION: Send(WebhookType.RESUMED, "info", "resumed from step {step} (preemption)"),
    AttemptReason.RESIZE: Send(WebhookType.RESUMED, "info", "resumed from step {step} (resize, {world_size} worker(s))"),
    AttemptReason.NODE_LOST: Send(WebhookType.NODE_LOST, "error", "a node was lost without notice: " + _BACK),
    AttemptReason.FAILURE: Send(WebhookType.RESTART, "error", "the worker group failed and was restarted: " + _BACK),
}
NOT_SENT: dict[EventType, str] = {  # and why a receiver does not hear them
    EventType.PROGRESS: "bookkeeping before the next attempt, which is the news",
    EventType.VALIDATION: "the steward sends it itself, with its images (steward.build_services)",
    EventType.EXPORTED: "the completed message names the adapters",
    EventType.STOP_REQUESTED: "the stopped message follows, once the checkpoint is committed",
}


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

SPOOL = "relay/webhook-spool"
DISCORD_TEXT_LIMIT = 2000  # characters in a message's content
DISCORD_FILES_PER_MESSAGE = 10


def rank(severity: str) -> int:
    return SEVERITIES.index(severity) if severity in SEVERITIES else SEVERITIES.index("info")


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


# -- policies (pure) ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """Timeouts and backoff. Delays double from `base` up to `cap`, with jitter so that restarted
    senders do not retry in step."""

    timeout: float = 10.0
    base: float = 1.0
    cap: float = 60.0


def drop_choice(severities: list[str]) -> int:
    """Index to drop from a full queue (the new message last): the oldest of the least severe."""
    worst = max(rank(s) for s in severities)
    return next(i for i, s in enumerate(severities) if rank(s) == worst)


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


def backend_key(backend: WebhookConfig) -> str:
    """Names a backend in spool file names without revealing its URL."""
    return hashlib.sha256(f"{backend.webhook_type}\n{backend.url.get_secret_value()}".encode()).hexdigest()[:12]


def _png_name(name: str, index: int) -> str:
    clean = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80] or f"image{index}"
    return clean if clean.lower().endswith(".png") else clean + ".png"


# -- delivery -------------------------------------------------------------------------------------------


class _Channel:
    """One backend: its queue, its delivery thread and its share of the spool."""

    def __init__(self, index: int, backend: WebhookConfig, notifier: Notifier) -> None:
        self.name = f"webhook[{index}] ({backend.webhook_type})"
        self.backend, self.notifier, self.key = backend, notifier, backend_key(backend)
        self.level = rank(backend.log_level)
        self.queue: deque[Message] = deque()
        self.cond = threading.Condition()
        self.spool_lock = threading.Lock()  # the thread and close() may both spool: one writer at a time
        self.closing_at: float | None = None  # monotonic time by which delivery stops
        self.unspool: list[str] = []  # spool files of dropped messages, deleted by the thread
        self.stats = {"delivered": 0, "dropped": 0, "rejected": 0, "retries": 0, "spooled": 0, "requests": 0}
        self.session = requests.Session()
        self.session.verify = not backend.ssl_no_verify
        self.thread = threading.Thread(target=self._run, name=f"notify-{index}", daemon=True)

    # called from event(): memory only
    def put(self, message: Message) -> None:
        with self.cond:
            self.queue.append(message)
            if len(self.queue) > self.notifier.max_queue:
                self._drop_one()
            self.cond.notify_all()

    def _drop_one(self) -> None:
        victim = self.queue[drop_choice([m.severity for m in self.queue])]
        self.queue.remove(victim)
        self.stats["dropped"] += 1
        if victim.spooled:
            self.unspool.append(victim.spooled)
        log.warning(
            "%s: queue full (%d), dropped a %s %s message; %d dropped so far",
            self.name,
            self.notifier.max_queue,
            victim.severity,
            victim.type,
            self.stats["dropped"],
        )

    # the delivery thread
    def _run(self) -> None:
        try:
            self._load_spool()
        except Exception as exc:  # storage trouble must not stop live delivery
            log.warning("%s: could not read the webhook spool: %s", self.name, self.notifier.redact(repr(exc)))
        attempt = 0
        while True:
            with self.cond:
                while not self.queue and self.closing_at is None:
                    self.cond.wait()
                if not self.queue or self._past_cutoff():
                    break
                message = self.queue[0]
            self._flush_unspool()
            try:
                status, retry_after = self._send(message)
            except Exception as exc:  # a message that cannot even be built: drop it, keep the thread alive
                log.warning("%s: could not send a %s message (%s)", self.name, message.type, type(exc).__name__)
                self._finish(message, delivered=False, status=None)
                continue
            policy = self.notifier.policy  # a 429 waits what the receiver asked; any other 4xx is dropped
            delay = (
                None
                if status is not None and 200 <= status < 300
                else retry_delay(
                    attempt + 1, policy.base, policy.cap, status=status, retry_after=retry_after, jitter=random.random()
                )
            )
            if delay is None:
                self._finish(message, delivered=status is not None and 200 <= status < 300, status=status)
                attempt = 0
                continue
            attempt += 1
            self.stats["retries"] += 1
            self._spool_pending()  # in trouble: persist everything queued, and (in _wait) what arrives
            if not self._wait(delay):
                break
        self._spool_pending()
        self._flush_unspool()
        self.session.close()

    def _past_cutoff(self) -> bool:
        return self.closing_at is not None and time.monotonic() >= self.closing_at

    def _wait(self, delay: float) -> bool:
        """Sleep through a backoff, spooling what arrives meanwhile; False once close's cutoff passes."""
        until = time.monotonic() + delay
        while True:
            with self.cond:
                stop = self.closing_at if self.closing_at is not None else until
                now = time.monotonic()
                if now >= min(until, stop):
                    return self.closing_at is None or now < self.closing_at
                self.cond.wait(min(until, stop) - now)
            self._spool_pending()

    def _send(self, message: Message) -> tuple[int | None, float | None]:
        """Post the message's remaining requests; (status of the last one, retry_after if any)."""
        backend, notifier = self.backend, self.notifier
        if backend.webhook_type == "raw":
            body = json.loads(notifier.redact(json.dumps(raw_payload(message, notifier.run_name), default=str)))
            requests_left = [{"json": body}]
            headers = {"X-API-Key": backend.auth_token.get_secret_value()} if backend.auth_token else {}
        else:
            clean = Message(
                message.type,
                message.severity,
                message.step,
                notifier.redact(message.message),
                json.loads(notifier.redact(json.dumps(message.fields, default=str))),
                message.images,
                message.timestamp,
            )
            requests_left = discord_requests(clean, notifier.run_name, backend.message_prefix or notifier.project)
            headers = {}
        for kwargs in requests_left[message.parts_done :]:
            timeout = notifier.policy.timeout
            if self.closing_at is not None:
                timeout = max(0.1, min(timeout, self.closing_at - time.monotonic()))
            try:
                self.stats["requests"] += 1
                answer = self.session.post(backend.url.get_secret_value(), headers=headers, timeout=timeout, **kwargs)
            except requests.RequestException as exc:
                log.info("%s: %s not delivered: %s", self.name, message.type, type(exc).__name__)
                return None, None
            if not 200 <= answer.status_code < 300:
                log.info("%s: %s answered %d", self.name, message.type, answer.status_code)
                return answer.status_code, _retry_after(answer)
            message.parts_done += 1
            _respect_bucket(answer)
        return 200, None

    def _finish(self, message: Message, delivered: bool, status: int | None) -> None:
        with self.cond:
            if message in self.queue:
                self.queue.remove(message)
        self.stats["delivered" if delivered else "rejected"] += 1
        if not delivered:
            log.warning("%s: gave up on a %s message: the receiver answered %s", self.name, message.type, status)
        if message.spooled:
            self._delete(message.spooled)

    # -- spool ------------------------------------------------------------------------------------
    def _spool_pending(self) -> None:
        if self.notifier.spool is None:
            return
        with self.spool_lock:
            self._spool_unlocked(self.notifier.spool)

    def _spool_unlocked(self, spool: RunStorage) -> None:
        with self.cond:
            pending = [m for m in self.queue if m.spooled is None]
        for message in pending:
            stamp = f"{int(message.timestamp * 1000):015d}.{message.seq:09d}"  # names sort in event order
            rel = f"{SPOOL}/{stamp}-{self.backend.webhook_type}-{self.key}-{message.id}.json"
            body = json.loads(self.notifier.redact(json.dumps(message.to_json(), default=str)))
            try:
                spool.write_json(rel, body)
            except Exception as exc:
                log.warning("%s: could not spool a %s message: %s", self.name, message.type, self.notifier.redact(repr(exc)))
                return
            message.spooled = rel
            self.stats["spooled"] += 1

    def _load_spool(self) -> None:
        """Queue this backend's spooled messages ahead of new ones, oldest first. A file whose backend is
        no longer configured goes to the first backend of its type, or is deleted with a warning."""
        spool = self.notifier.spool
        if spool is None:
            return
        mine = []
        for name in spool.listdir(SPOOL):
            parts = name.removesuffix(".json").split("-")
            if len(parts) != 4 or not name.endswith(".json"):
                continue
            _, kind, key, _ = parts
            if key == self.key or (key not in self.notifier.keys and self.notifier.adopter(kind) is self):
                mine.append(name)
            elif key not in self.notifier.keys and self.notifier.adopter(kind) is None and self is self.notifier.channels[0]:
                log.warning("%s: spooled %s message for a backend no longer configured: deleted", self.name, kind)
                self._delete(f"{SPOOL}/{name}")
        loaded = []
        for name in sorted(mine):
            data = spool.read_json(f"{SPOOL}/{name}")
            if data is not None:
                loaded.append(Message.from_json(data, spooled=f"{SPOOL}/{name}"))
        if loaded:
            log.info("%s: %d spooled message(s) from an earlier run to send first", self.name, len(loaded))
        with self.cond:
            self.queue.extendleft(reversed(loaded))
            while len(self.queue) > self.notifier.max_queue:
                self._drop_one()

    def _flush_unspool(self) -> None:
        with self.cond:
            stale, self.unspool = self.unspool, []
        for rel in stale:
            self._delete(rel)

    def _delete(self, rel: str) -> None:
        try:
            self.notifier.spool.delete(rel)
        except Exception as exc:
            log.warning("%s: could not delete spool file %s: %s", self.name, rel, self.notifier.redact(repr(exc)))


def _retry_after(answer: requests.Response) -> float | None:
    """Discord's 429 body carries retry_after in seconds (float); the Retry-After header is the fallback."""
    try:
        body = answer.json()
    except ValueError:
        body = None
    return retry_after(answer.headers, body)


def _respect_bucket(answer: requests.Response) -> None:
    """Discord says when a rate-limit bucket is empty (X-RateLimit-Remaining 0): wait for its reset
    instead of provoking a 429. Bounded, so a wrong header cannot stall the thread."""
    if answer.headers.get("X-RateLimit-Remaining") == "0":
        try:
            time.sleep(min(5.0, float(answer.headers.get("X-RateLimit-Reset-After", 0))))
        except ValueError:
            pass


class Notifier:
    """Sends run events to every configured webhook backend, off the caller's thread.

    backends: the config's `webhook` list; run_name: shown in every message; spool: the run's storage
    (None keeps undelivered messages in memory only); project: Discord's prefix when a backend has no
    message_prefix. `start()` starts one delivery thread per backend (`with Notifier(...)` does it);
    `close(timeout)` delivers what it can within timeout, then spools the rest."""

    close_seconds = 30.0  # at a run's end the steward waits at most this long: the spool keeps the rest

    def __init__(
        self,
        backends: list[WebhookConfig],
        run_name: str,
        spool: RunStorage | None = None,
        *,
        project: str | None = None,
        max_queue: int = 256,
        policy: RetryPolicy = RetryPolicy(),
        secrets: list[str | SecretStr] = (),
    ) -> None:
        self.run_name, self.spool, self.project = run_name, spool, project or run_name
        self.max_queue, self.policy = max_queue, policy
        secret = [
            *secrets,
            *(p for b in backends for p in url_parts(b.url.get_secret_value())),
            *(b.auth_token for b in backends if b.auth_token),
        ]
        self._redactor = Redactor(secret)
        self.channels = [_Channel(i, b, self) for i, b in enumerate(backends)]
        self.keys = {c.key for c in self.channels}
        self._closed = self._started = False
        self._late = 0
        self._seq = itertools.count()

    def start(self) -> Notifier:
        """Start the delivery threads (once). Events queued before it are delivered once it runs."""
        if not self._started and not self._closed:
            self._started = True
            for channel in self.channels:
                channel.thread.start()
        return self

    def adopter(self, kind: str) -> _Channel | None:
        return next((c for c in self.channels if c.backend.webhook_type == kind), None)

    def redact(self, text: str) -> str:
        """Mask this notifier's backend secrets and the process's installed ones."""
        text = self._redactor.redact(text)
        current = installed()
        return current.redact(text) if current else text

    def event(
        self,
        type: str,
        severity: str = "info",
        step: int | None = None,
        message: str = "",
        fields: dict[str, Any] | None = None,
        images: list[tuple[str, bytes]] | None = None,
    ) -> None:
        """Queue an event for every backend whose log_level admits it. Never blocks on I/O, never raises."""
        try:
            if self._closed:
                self._late += 1
                log.warning("notifier closed: %s event not sent (%d so far)", type, self._late)
                return
            if severity not in SEVERITIES:
                log.warning("unknown severity %r for a %s event: sent as info", severity, type)
                severity = "info"
            now, seq = time.time(), next(self._seq)
            shots = [(_png_name(n, i), bytes(b)) for i, (n, b) in enumerate(images or [])]
            for channel in self.channels:
                if rank(severity) <= channel.level:
                    channel.put(Message(type, severity, step, message, dict(fields or {}), shots, now, seq=seq))
        except Exception:  # a notification must never take training down
            log.exception("could not queue a %s event", type)

    def on_event(self, event: dict[str, Any]) -> None:
        """The steward's service hook: send a ledger event as webhook_for says."""
        send = webhook_for(event)
        if send is None:
            return
        fields = {k: v for k, v in event.items() if k not in ("type", "step", "time")}
        try:
            text = send.template.format_map(_Fields(fields, step=event.get("step")))
        except (IndexError, ValueError):
            text = str(event["type"]).replace("_", " ")
        self.event(send.type, send.severity, event.get("step"), text, fields)

    def pending(self) -> int:
        return sum(len(c.queue) for c in self.channels)

    def stats(self) -> list[dict[str, int]]:
        """Per backend: delivered, dropped, rejected, retries, spooled, requests, pending."""
        return [{**c.stats, "pending": len(c.queue)} for c in self.channels]

    def close(self, timeout: float = 10.0) -> bool:
        """Deliver what can be within `timeout`, spool the rest; True when nothing is left undelivered
        and unspooled. A quarter of the time (at most 5 s) is kept for writing the spool."""
        if self._closed:
            return True
        self._closed = True
        start = time.monotonic()
        reserve = min(5.0, timeout / 4) if self.spool is not None else 0.0
        cutoff = start + timeout - reserve
        for channel in self.channels:
            with channel.cond:
                channel.closing_at = cutoff
                channel.cond.notify_all()
        started = self._started
        for channel in self.channels:  # past the cutoff each thread spools its own queue and ends
            if started:
                channel.thread.join(max(0.0, cutoff + 0.05 - time.monotonic()))
        for channel in self.channels:  # a thread stuck in a request that began before close, or none: spool for it
            if channel.thread.is_alive() or not started:
                channel._spool_pending()
        for channel in self.channels:
            if started:
                channel.thread.join(max(0.0, start + timeout - time.monotonic()))
        lost = sum(1 for c in self.channels for m in c.queue if m.spooled is None)
        if lost or any(c.thread.is_alive() for c in self.channels):
            log.warning("webhooks: %d message(s) neither delivered nor spooled at close", lost)
            return False
        return True

    def __enter__(self) -> Notifier:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
