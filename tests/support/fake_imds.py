"""A fake cloud metadata service on loopback: AWS IMDSv2 (token + spot/instance-action + the rebalance
recommendation) and GCP (instance/preempted). It answers "no notice" until a test calls `announce()` (or
`recommend_rebalance()`)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from support.loopback import LoopbackServer, Request

TOKEN = "fake-imds-token"


class FakeMetadata(LoopbackServer):
    """`with FakeMetadata() as imds:` (or start()/close()); point the spot agent at `imds.url`."""

    name = "fake-imds"

    def __init__(self, port: int = 0) -> None:
        super().__init__(port)
        self.notice_at: datetime | None = None
        self.rebalance_at: datetime | None = None

    @property
    def requests(self) -> list[tuple[str, str]]:
        """(method, path) of every request, oldest first."""
        with self.lock:
            return [(r.method, r.path) for r in self.received]

    def announce(self, seconds: float = 120) -> None:
        """From now on: a reclaim `seconds` ahead."""
        self.notice_at = datetime.now(UTC) + timedelta(seconds=seconds)

    def recommend_rebalance(self) -> None:
        """From now on: an EC2 rebalance recommendation (elevated risk of a reclaim), issued now."""
        self.rebalance_at = datetime.now(UTC)

    def close(self) -> None:
        self.stop()

    def handle(self, handler, request: Request) -> None:
        headers = request.headers
        if request.method == "PUT":
            if request.path == "/latest/api/token" and headers.get("x-aws-ec2-metadata-token-ttl-seconds"):
                return self.reply(handler, 200, TOKEN.encode(), content_type="text/plain")
            return self.reply(handler, 400, content_type="text/plain")
        if request.method == "GET" and request.path == "/latest/meta-data/spot/instance-action":
            if headers.get("x-aws-ec2-metadata-token") != TOKEN:
                return self.reply(handler, 401, content_type="text/plain")
            if self.notice_at is None:
                return self.reply(handler, 404, b"Not Found", content_type="text/plain")
            when = self.notice_at.strftime("%Y-%m-%dT%H:%M:%SZ")
            return self.reply(handler, 200, json.dumps({"action": "terminate", "time": when}).encode())
        if request.method == "GET" and request.path == "/latest/meta-data/events/recommendations/rebalance":
            if headers.get("x-aws-ec2-metadata-token") != TOKEN:
                return self.reply(handler, 401, content_type="text/plain")
            if self.rebalance_at is None:
                return self.reply(handler, 404, b"Not Found", content_type="text/plain")
            when = self.rebalance_at.strftime("%Y-%m-%dT%H:%M:%SZ")
            return self.reply(handler, 200, json.dumps({"noticeTime": when}).encode())
        if request.method == "GET" and request.path == "/computeMetadata/v1/instance/preempted":
            if headers.get("metadata-flavor") != "Google":
                return self.reply(handler, 403, content_type="text/plain")
            return self.reply(handler, 200, b"TRUE" if self.notice_at else b"FALSE", content_type="text/plain")
        self.reply(handler, 404, content_type="text/plain")
