"""A loopback HTTP receiver for webhook tests: records every POST, and can misbehave on purpose.

Modes: `up` (answer 204), `close` (accept, then drop the connection unanswered), `refuse` (nothing
listens on the port: connections are refused), `slow` (sleep before answering), plus a number of
requests to answer 429 with Discord's `retry_after` body, or another error status.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Part:
    name: str
    filename: str | None
    content_type: str
    data: bytes


@dataclass
class Received:
    """One request as it arrived (answered or not), with the receiver's clock."""

    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    status: int
    parts: list[Part] = field(default_factory=list)

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
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    return [Part(part.get_param("name", header="content-disposition"), part.get_filename(),
                 part.get_content_type(), part.get_payload(decode=True) or b"")
            for part in message.iter_parts()]


class WebhookReceiver:
    """Start with `with WebhookReceiver() as hook:`; post to `hook.url(path)`."""

    def __init__(self, port: int = 0) -> None:
        self.requests: list[Received] = []  # answered with 2xx only, in arrival order
        self.attempts: list[Received] = []  # every request that arrived, whatever the answer
        self.mode = "up"
        self.delay = 0.0
        self._answers: list[tuple[int, dict[str, str], bytes]] = []  # queued non-2xx answers
        self._lock = threading.Condition()
        self._port = port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def __enter__(self) -> WebhookReceiver:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                receiver._handle(self)

            def log_message(self, *args) -> None:  # keep test output quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self._port), Handler)
        self._server.daemon_threads = True
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="webhook-receiver", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def port(self) -> int:
        return self._port

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self._port}{path}"

    # -- misbehaviour ------------------------------------------------------------------------------
    def refuse(self) -> None:
        """Stop listening: connections are refused until up()."""
        self.stop()
        self.mode = "refuse"

    def close_connections(self) -> None:
        """Accept connections and drop them without an answer."""
        self.mode = "close"

    def slow(self, seconds: float) -> None:
        self.delay = seconds

    def rate_limit(self, count: int, retry_after: float = 0.2) -> None:
        """Answer the next `count` requests 429 with Discord's body and Retry-After header."""
        body = json.dumps({"message": "You are being rate limited.", "retry_after": retry_after,
                           "global": False}).encode()
        headers = {"Content-Type": "application/json", "Retry-After": str(max(1, round(retry_after)))}
        with self._lock:
            self._answers += [(429, headers, body)] * count

    def fail(self, count: int, status: int = 500) -> None:
        with self._lock:
            self._answers += [(status, {}, b"error")] * count

    def up(self) -> None:
        """Back to normal: listening, fast, answering 204."""
        self.delay, self.mode = 0.0, "up"
        if self._server is None:
            self.start()

    # -- what arrived ------------------------------------------------------------------------------
    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Block until `count` requests were answered 2xx (or the timeout); returns them."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self.requests) < count and time.monotonic() < deadline:
                self._lock.wait(timeout=max(0.0, deadline - time.monotonic()))
            return list(self.requests)

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length)
        headers = {k.lower(): v for k, v in handler.headers.items()}
        if self.mode == "close":
            handler.close_connection = True
            handler.connection.close()
            return
        if self.delay:
            time.sleep(self.delay)
        with self._lock:
            status, extra, reply = self._answers.pop(0) if self._answers else (204, {}, b"")
        content_type = headers.get("content-type", "")
        parts = parse_multipart(content_type, body) if content_type.startswith("multipart/") else []
        seen = Received(handler.path, headers, body, time.monotonic(), status, parts)
        with self._lock:  # recorded before the reply: once the sender has its answer, the test sees it
            self.attempts.append(seen)
            if 200 <= status < 300:
                self.requests.append(seen)
            self._lock.notify_all()
        handler.send_response(status)
        for key, value in extra.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(reply)))
        handler.end_headers()
        handler.wfile.write(reply)
