"""A loopback HTTP receiver for webhook tests: records every POST, and can misbehave on purpose.

Modes: up (answer 204), `close_connections` (accept, then drop the connection unanswered), `refuse`
(nothing listens on the port: connections are refused), `slow` (sleep before answering), plus a number
of requests to answer 429 with Discord's `retry_after` body, or another error status. Each is a
support.loopback.Fault; `up()` ends the first three and leaves the counted answers queued.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import time
from dataclasses import dataclass, field
from typing import Any

from support.loopback import Fault, LoopbackServer, Request


@dataclass
class Part:
    name: str
    filename: str | None
    content_type: str
    data: bytes


@dataclass
class Received(Request):
    """One request as it arrived (answered or not), with the receiver's clock."""

    parts: list[Part] = field(default_factory=list)

    def __post_init__(self) -> None:
        content_type = self.headers.get("content-type", "")
        if content_type.startswith("multipart/"):
            self.parts = parse_multipart(content_type, self.body)

    @property
    def json(self) -> Any:
        if self.headers.get("content-type", "").startswith("application/json"):
            return json.loads(self.body)
        payload = next((p for p in self.parts if p.name == "payload_json"), None)
        return json.loads(payload.data) if payload else None

    @property
    def files(self) -> list[Part]:
        return [p for p in self.parts if p.filename is not None]


def parse_multipart(content_type: str, body: bytes) -> list[Part]:
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    return [
        Part(
            part.get_param("name", header="content-disposition"),
            part.get_filename(),
            part.get_content_type(),
            part.get_payload(decode=True) or b"",
        )
        for part in message.iter_parts()
    ]


class WebhookReceiver(LoopbackServer):
    """Start with `with WebhookReceiver() as hook:`; post to `hook.url(path)`."""

    name = "webhook-receiver"
    request_class = Received
    default_path = "/hook"

    @property
    def attempts(self) -> list[Received]:
        """Every request that arrived, whatever the answer, in arrival order."""
        with self.lock:
            return list(self.received)

    @property
    def requests(self) -> list[Received]:
        """The requests answered 2xx, in arrival order."""
        with self.lock:
            return [r for r in self.received if r.status is not None and 200 <= r.status < 300]

    def handle(self, handler, request: Received) -> None:
        self.reply(handler, 204, b"", content_type="text/plain")

    # -- misbehaviour ------------------------------------------------------------------------------
    def refuse(self) -> None:
        """Stop listening: connections are refused until up()."""
        self.fail(Fault("refuse"))

    def close_connections(self) -> None:
        """Accept connections and drop them without an answer."""
        self.fail(Fault("drop"))

    def slow(self, seconds: float) -> None:
        self.fail(Fault("delay", delay=seconds))

    def rate_limit(self, count: int, retry_after: float = 0.2) -> None:
        """Answer the next `count` requests 429 with Discord's body and Retry-After header."""
        body = json.dumps({"message": "You are being rate limited.", "retry_after": retry_after, "global": False}).encode()
        self.fail(
            Fault(
                "status",
                status=429,
                count=count,
                body=body,
                headers={"Content-Type": "application/json", "Retry-After": str(max(1, round(retry_after)))},
            )
        )

    def fail(self, count_or_fault: int | Fault, status: int = 500) -> None:  # type: ignore[override]
        """`fail(count, status=500)`: answer the next `count` requests `status`; or add any Fault."""
        if isinstance(count_or_fault, Fault):
            return super().fail(count_or_fault)
        return super().fail(Fault("status", status=status, count=count_or_fault, body=b"error"))

    def up(self) -> None:
        """Back to normal: listening, fast, answering (queued error answers stay queued)."""
        self.heal("refuse", "drop", "delay")

    # -- what arrived ------------------------------------------------------------------------------
    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Block until `count` requests were answered 2xx (or the timeout); returns them."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while len(self.requests) < count and time.monotonic() < deadline:
                self.lock.wait(timeout=max(0.0, deadline - time.monotonic()))
            return self.requests
