"""The loopback servers' one Fault type (tests/support/loopback.py), seen from a plain HTTP client."""

from __future__ import annotations

import http.client
import time
import urllib.error
import urllib.request

import pytest

from support.loopback import Fault, LoopbackServer


class Echo(LoopbackServer):
    def handle(self, handler, request) -> None:
        self.reply(handler, 200, {"path": request.path})


def _get(url: str) -> tuple[int, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, dict(answer.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers)


def test_counted_and_timed_status_faults_with_retry_after():
    with Echo() as server:
        server.fail(Fault("status", status=429, count=2, retry_after=3, path="/commit"))
        assert _get(server.url("/other"))[0] == 200  # another path: not affected
        first, second, third = (_get(server.url("/commit")) for _ in range(3))
        assert (first[0], first[1]["Retry-After"]) == (429, "3") and second[0] == 429 and third[0] == 200
        server.fail(Fault("status", status=503, seconds=0.3))
        assert _get(server.url("/a"))[0] == 503
        time.sleep(0.35)
        assert _get(server.url("/a"))[0] == 200
        assert [r.status for r in server.received] == [200, 429, 429, 200, 503, 200]
        assert server.count("GET", "/commit", 429) == 2


def test_refuse_drop_and_delay_until_healed():
    with Echo() as server:
        url = server.url("/x")
        server.fail(Fault("refuse"))
        with pytest.raises(urllib.error.URLError):
            _get(url)
        server.heal()
        assert _get(url)[0] == 200 and server.url("/x") == url  # listening again on the same port
        server.fail(Fault("drop"))
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
            connection.request("GET", "/x")
            connection.getresponse()
        assert server.received[-1].status is None  # recorded, unanswered
        server.heal("drop")
        server.fail(Fault("delay", delay=0.3))
        start = time.monotonic()
        assert _get(url)[0] == 200 and time.monotonic() - start >= 0.3
        server.heal()
        start = time.monotonic()
        assert _get(url)[0] == 200 and time.monotonic() - start < 0.3


def test_a_refuse_for_some_seconds_ends_by_itself():
    with Echo() as server:
        server.fail(Fault("refuse", seconds=0.3))
        with pytest.raises(urllib.error.URLError):
            _get(server.url("/x"))
        time.sleep(0.5)
        assert _get(server.url("/x"))[0] == 200


def test_a_fault_kind_is_checked():
    with pytest.raises(ValueError, match="kind"):
        Fault("explode")
