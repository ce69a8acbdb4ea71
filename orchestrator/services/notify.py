"""Webhook delivery (Discord or raw JSON) that never slows or stops training; what each event says and
the shapes the backends receive are messages.py's.

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

import hashlib
import itertools
import json
import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

import requests
from pydantic import SecretStr

from orchestrator.core.background import Background
from orchestrator.core.failure import HttpFailure, Retries, decide
from orchestrator.core.http import is_redirect, outbound_session
from orchestrator.core.policy import retry_after
from orchestrator.core.redact import Redactor, installed, url_parts
from orchestrator.core.store import RunStorage
from orchestrator.services.messages import (  # noqa: F401 - the tables, read here too (notify.SENT, ...)
    ATTEMPTS,
    DISCORD_FILES_PER_MESSAGE,
    DISCORD_TEXT_LIMIT,
    NOT_SENT,
    SENT,
    SEVERITIES,
    Message,
    Send,
    WebhookType,
    _Fields,
    _png_name,
    discord_requests,
    discord_text,
    human_times,
    raw_payload,
    rank,
    webhook_for,
)
from relay_train.config.files import WebhookConfig

log = logging.getLogger(__name__)

SPOOL = "relay/webhook-spool"

# -- what each ledger event sends ------------------------------------------------------------------------


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


def backend_key(backend: WebhookConfig) -> str:
    """Names a backend in spool file names without revealing its URL."""
    return hashlib.sha256(f"{backend.webhook_type}\n{backend.url.get_secret_value()}".encode()).hexdigest()[:12]


# -- delivery -------------------------------------------------------------------------------------------


class _Channel:
    """One backend: its queue and delivery thread (a Background: retries as failure.decide says, a full
    queue drops the oldest of the least severe) and its share of the spool."""

    def __init__(self, index: int, backend: WebhookConfig, notifier: Notifier) -> None:
        self.name = f"webhook[{index}] ({backend.webhook_type})"
        self.backend, self.notifier, self.key = backend, notifier, backend_key(backend)
        self.level = rank(backend.log_level)
        self.spool_lock = threading.Lock()  # the thread and close() may both spool: one writer at a time
        self.unspool: list[str] = []  # spool files of dropped messages, deleted by the thread
        self.counts = {"delivered": 0, "rejected": 0, "spooled": 0, "requests": 0}
        self.session = outbound_session(verify=not backend.ssl_no_verify)  # never follows a redirect
        policy = notifier.policy  # a 429 waits what the receiver asked; any other 4xx is dropped
        # no bound: until delivered, or close's deadline; a message that cannot even be built is dropped
        retries = Retries(base=policy.base, cap=policy.cap, only=(HttpFailure,))
        self.worker: Background[Message] = Background(
            f"notify-{index}",
            self._deliver,
            max_queue=notifier.max_queue,
            retries=retries,
            drop=lambda queued: drop_choice([m.severity for m in queued]),
            on_drop=self._dropped,
            on_give_up=self._gave_up,
            on_trouble=self._spool_pending,  # in trouble: persist everything queued, and what arrives meanwhile
            on_start=self._start,
            on_end=self._ended,
            decide_for=lambda exc, attempt: decide(exc, attempt, retries, jitter=random.random()),
        )

    @property
    def stats(self) -> dict[str, int]:
        return {**self.counts, "dropped": self.worker.stats["dropped"], "retries": self.worker.stats["retries"]}

    @property
    def thread(self) -> threading.Thread:
        return self.worker.thread

    @property
    def queue(self) -> list[Message]:
        return self.worker.items()

    # called from event(): memory only
    def put(self, message: Message) -> None:
        self.worker.put(message)

    def _dropped(self, victim: Message) -> None:
        if victim.spooled:
            self.unspool.append(victim.spooled)
        log.warning(
            "%s: queue full (%d), dropped a %s %s message; %d dropped so far",
            self.name,
            self.notifier.max_queue,
            victim.severity,
            victim.type,
            self.worker.stats["dropped"],
        )

    # the delivery thread
    def _start(self) -> None:
        try:
            self._load_spool()
        except Exception as exc:  # storage trouble must not stop live delivery
            log.warning("%s: could not read the webhook spool: %s", self.name, self.notifier.redact(repr(exc)))

    def _deliver(self, message: Message) -> None:
        """One try at `message`; HttpFailure (for failure.decide) when it did not get through."""
        self._flush_unspool()
        status, retry_after = self._send(message)
        if not (status is not None and 200 <= status < 300):
            raise HttpFailure(status, retry_after)
        self.counts["delivered"] += 1
        if message.spooled:
            self._delete(message.spooled)

    def _gave_up(self, message: Message, decision) -> None:
        """A message the receiver rejects outright (a 4xx other than 408/425/429), or that cannot be built."""
        self.counts["rejected"] += 1
        log.warning("%s: gave up on a %s message: %s", self.name, message.type, decision.reason)
        if message.spooled:
            self._delete(message.spooled)

    def _ended(self) -> None:
        self._spool_pending()
        self._flush_unspool()
        self.session.close()

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
            if (closing_at := self.worker.closing_at) is not None:
                timeout = max(0.1, min(timeout, closing_at - time.monotonic()))
            try:
                self.counts["requests"] += 1
                answer = self.session.post(backend.url.get_secret_value(), headers=headers, timeout=timeout, **kwargs)
            except requests.RequestException as exc:
                log.info("%s: %s not delivered: %s", self.name, message.type, type(exc).__name__)
                return None, None
            if is_redirect(answer.status_code):  # never followed: it would carry the token elsewhere
                log.warning(
                    "%s: the receiver answered %d, a redirect; Relay never follows one (the request holds the "
                    "webhook's secret): point the webhook config at the final address",
                    self.name,
                    answer.status_code,
                )
                return answer.status_code, None
            if not 200 <= answer.status_code < 300:
                log.info("%s: %s answered %d", self.name, message.type, answer.status_code)
                return answer.status_code, _retry_after(answer)
            message.parts_done += 1
            _respect_bucket(answer)
        return 200, None

    # -- spool ------------------------------------------------------------------------------------
    def _spool_pending(self) -> None:
        if self.notifier.spool is None:
            return
        with self.spool_lock:
            self._spool_unlocked(self.notifier.spool)

    def _spool_unlocked(self, spool: RunStorage) -> None:
        pending = [m for m in self.worker.items() if m.spooled is None]
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
            self.counts["spooled"] += 1

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
        self.worker.put_front(loaded)

    def _flush_unspool(self) -> None:
        with self.worker.cond:  # _dropped appends under it
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
                channel.worker.start()
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
        fields.update(human_times(event))
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
            channel.worker.begin_close(cutoff)
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
