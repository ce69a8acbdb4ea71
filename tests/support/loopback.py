"""One base for the HTTP servers tests run on loopback (the Hub, the webhook receiver, the cloud metadata
service), and one `Fault` type for making any of them misbehave.

A server listens on 127.0.0.1 (a free port unless one is given) from `start()` until `stop()`, or as a
context manager. It records every request it receives (`received`, oldest first) with its answer, and
answers through the subclass's `handle(...)` unless a fault applies first:

    server.fail(Fault("status", status=429, count=3, retry_after=1))   # the next 3 requests: 429
    server.fail(Fault("status", status=500, seconds=2.0, path="/commit/"))  # 2 s of 500s on one route
    server.fail(Fault("delay", delay=0.5))   # every request waits 0.5 s first, until heal()
    server.fail(Fault("drop"))               # connections are accepted, then closed unanswered
    server.fail(Fault("refuse"))             # nothing listens on the port: connections are refused
    server.heal()                            # all gone (or heal("refuse", "delay") for some kinds)
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

KINDS = ("status", "drop", "delay", "refuse")


class Url(str):
    """The server's base URL, a str; `url(path)` is a URL under it (`url()`: under the default path)."""

    def __new__(cls, base: str, default_path: str = "") -> Url:
        url = super().__new__(cls, base)
        url.default_path = default_path
        return url

    def __call__(self, path: str | None = None) -> str:
        return self + (self.default_path if path is None else path)


@dataclass
class Fault:
    """One misbehaviour. It applies to the next `count` requests, or to every request for `seconds`, or
    (neither given) until heal(); starting `start_in` seconds from now; only on paths the regex `path`
    matches, when given. `status` faults answer `status` (with Retry-After: `retry_after` s, when given,
    and `body`/`headers` when given, else the server's own error body); `delay` faults wait `delay` s and
    then answer normally; `drop` faults close the connection unanswered; `refuse` stops listening."""

    kind: str = "status"
    status: int = 500
    count: int | None = None
    seconds: float | None = None
    retry_after: float | None = None
    delay: float = 0.0
    path: str | None = None
    start_in: float = 0.0
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    since: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"a Fault's kind is one of {KINDS}, got {self.kind!r}")
        self.since = time.monotonic() + self.start_in
        self._path = re.compile(self.path) if self.path else None

    def applies(self, path: str, now: float) -> bool:
        if now < self.since or (self.count is not None and self.count <= 0):
            return False
        if self.seconds is not None and now >= self.since + self.seconds:
            return False
        return self._path is None or self._path.search(path) is not None

    def answer_headers(self) -> dict[str, str]:
        extra = {"Retry-After": f"{self.retry_after:g}"} if self.retry_after is not None else {}
        return {**extra, **self.headers}


@dataclass
class Request:
    """One request as it arrived, with the server's clock (time.monotonic) and the status it was answered
    with (None when it was dropped unanswered)."""

    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    at: float
    status: int | None = None
    query: dict[str, list[str]] = field(default_factory=dict)

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.headers.get("content-type", "").startswith("application/json") else None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: LoopbackServer

    def log_message(self, format, *args) -> None:  # noqa: A002 - quiet: tests read what was recorded
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.owner._serve(self, "GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self.owner._serve(self, "HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self.owner._serve(self, "POST")

    def do_PUT(self) -> None:  # noqa: N802
        self.owner._serve(self, "PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self.owner._serve(self, "DELETE")


class LoopbackServer:
    """An HTTP server on 127.0.0.1 in daemon threads. Subclasses implement `handle`."""

    name = "loopback"
    request_class: type[Request] = Request
    default_path = ""  # what url() points at

    def __init__(self, port: int = 0) -> None:
        self._port = port
        self._httpd: ThreadingHTTPServer | None = None
        self._timers: list[threading.Timer] = []
        self.lock = threading.Condition(threading.RLock())  # guards received and faults; notified per request
        self.received: list[Request] = []
        self.faults: list[Fault] = []

    # -- life -------------------------------------------------------------------------------------------
    def start(self):
        """Listen (again, on the same port after a refuse) and serve from a daemon thread; returns self."""
        if self._httpd is not None:
            return self
        handler = type(f"{type(self).__name__}Handler", (_Handler,), {"owner": self})
        httpd = ThreadingHTTPServer(("127.0.0.1", self._port), handler)
        httpd.daemon_threads = True
        self._port = httpd.server_address[1]
        self._httpd = httpd
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name=self.name, daemon=True).start()
        return self

    def stop(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._stop_listening()

    def _stop_listening(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> Url:
        return Url(f"http://127.0.0.1:{self._port}", self.default_path)

    # -- faults -----------------------------------------------------------------------------------------
    def fail(self, fault: Fault) -> None:
        with self.lock:
            self.faults.append(fault)
        if fault.kind == "refuse":
            if fault.start_in > 0:
                self._later(fault.start_in, self._stop_listening)
            else:
                self._stop_listening()
            if fault.seconds is not None:
                self._later(fault.start_in + fault.seconds, lambda: self.heal("refuse"))

    def heal(self, *kinds: str) -> None:
        """Remove the faults of these kinds (all, when none is named); listen again after a refuse."""
        with self.lock:
            refused = any(f.kind == "refuse" for f in self.faults if not kinds or f.kind in kinds)
            self.faults = [f for f in self.faults if kinds and f.kind not in kinds]
        if refused:
            self.start()

    def _later(self, seconds: float, action) -> None:
        timer = threading.Timer(seconds, action)
        timer.daemon = True
        self._timers.append(timer)
        timer.start()

    def _take_fault(self, path: str) -> Fault | None:
        now = time.monotonic()
        with self.lock:
            for fault in self.faults:
                if fault.kind != "refuse" and fault.applies(path, now):
                    if fault.count is not None:
                        fault.count -= 1
                    return fault
        return None

    # -- serving ----------------------------------------------------------------------------------------
    def _serve(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        url = urlparse(handler.path)
        body = read_body(handler) if method in ("POST", "PUT") else b""
        request = self.request_class(
            method,
            url.path,
            {k.lower(): v for k, v in handler.headers.items()},
            body,
            time.monotonic(),
            query=parse_qs(url.query),
        )
        handler.request_record = request  # type: ignore[attr-defined]
        fault = self._take_fault(url.path)
        if fault is not None and fault.kind == "delay":
            time.sleep(fault.delay)
        elif fault is not None and fault.kind == "drop":
            self._record(request)
            handler.close_connection = True
            handler.connection.close()
            return
        elif fault is not None:
            body, headers, content_type = self.fault_answer(fault)
            self.reply(handler, fault.status, body, fault.answer_headers() | headers, content_type)
            return
        self.handle(handler, request)

    def handle(self, handler: BaseHTTPRequestHandler, request: Request) -> None:
        """Answer one request with `reply(...)`."""
        raise NotImplementedError

    def fault_answer(self, fault: Fault) -> tuple[bytes, dict[str, str], str]:
        """(body, headers, content type) of a status fault's answer; subclasses speak their API's errors."""
        return (fault.body if fault.body is not None else b"error"), {}, "text/plain"

    def reply(
        self,
        handler: BaseHTTPRequestHandler,
        status: int,
        body: bytes | dict | list = b"",
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        """Record the request with its status (before the answer goes out: once a client has its answer,
        the test sees the request), then answer it."""
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        request: Request = handler.request_record  # type: ignore[attr-defined]
        request.status = status
        self._record(request)
        headers = dict(headers or {})
        handler.send_response(status)
        handler.send_header("Content-Type", headers.pop("Content-Type", content_type))
        handler.send_header("Content-Length", str(len(data)))
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(data)

    def _record(self, request: Request) -> None:
        with self.lock:
            self.received.append(request)
            self.lock.notify_all()

    def count(self, method: str, pattern: str, status: int | None = None) -> int:
        """Requests received with this method, a path the regex `pattern` matches, and (when given) status."""
        with self.lock:
            return sum(
                1
                for r in self.received
                if r.method == method and re.search(pattern, r.path) and (status is None or r.status == status)
            )


def read_body(handler: BaseHTTPRequestHandler) -> bytes:
    """The request's body, by Content-Length or chunked."""
    length = int(handler.headers.get("Content-Length") or 0)
    if length:
        return handler.rfile.read(length)
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while (size := int(handler.rfile.readline().strip() or b"0", 16)) > 0:
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()
        handler.rfile.readline()
        return b"".join(chunks)
    return b""
