"""A fake cloud metadata service on loopback: AWS IMDSv2 (token + spot/instance-action) and GCP
(instance/preempted). It answers "no notice" until a test calls `announce()`."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN = "fake-imds-token"


class FakeMetadata:
    def __init__(self):
        self.notice_at: datetime | None = None
        self.requests: list[tuple[str, str]] = []
        handler = self._handler()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def announce(self, seconds: float = 120) -> None:
        """From now on: a reclaim `seconds` ahead."""
        self.notice_at = datetime.now(timezone.utc) + timedelta(seconds=seconds)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body: str = "") -> None:
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self):
                fake.requests.append(("PUT", self.path))
                if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    return self._send(200, TOKEN)
                self._send(400)

            def do_GET(self):
                fake.requests.append(("GET", self.path))
                if self.path == "/latest/meta-data/spot/instance-action":
                    if self.headers.get("X-aws-ec2-metadata-token") != TOKEN:
                        return self._send(401)
                    if fake.notice_at is None:
                        return self._send(404, "Not Found")
                    when = fake.notice_at.strftime("%Y-%m-%dT%H:%M:%SZ")
                    return self._send(200, json.dumps({"action": "terminate", "time": when}))
                if self.path == "/computeMetadata/v1/instance/preempted":
                    if self.headers.get("Metadata-Flavor") != "Google":
                        return self._send(403)
                    return self._send(200, "TRUE" if fake.notice_at else "FALSE")
                self._send(404)

        return Handler
