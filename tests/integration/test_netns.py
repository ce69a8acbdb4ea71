"""The two-namespace link itself (tests/support/netns.py): shaped to its rate, cut on demand, torn down."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from support.netns import IFNAME, TwoNodes, unavailable  # tests/ is on sys.path (conftest rootdir)

SERVER = """
import socket, sys, time
s = socket.socket(); s.bind((sys.argv[1], 5001)); s.listen(1); s.settimeout(20)
c, _ = s.accept(); c.settimeout(5); n = 0; start = None
while True:
    d = c.recv(1 << 20)
    if not d: break
    start = start or time.perf_counter()
    n += len(d)
print(n, time.perf_counter() - start)
"""
CLIENT = """
import socket, sys, time
end = time.monotonic() + 10
while True:
    try:
        c = socket.create_connection((sys.argv[1], 5001), timeout=2); break
    except OSError:
        if time.monotonic() > end: raise
        time.sleep(0.1)
c.settimeout(float(sys.argv[3]))
block, start = b"x" * (1 << 20), time.perf_counter()
try:
    for _ in range(int(sys.argv[2])):
        c.sendall(block)
    c.close()
    print(f"{time.perf_counter() - start:.3f}")
except OSError:
    print("stalled")
"""


@pytest.fixture
def nodes():
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    with TwoNodes(rate_mbit=40) as two:
        yield two


def _send(nodes: TwoNodes, mib: int, timeout: float, cut_after: float | None = None) -> tuple[str, str]:
    """Send `mib` MiB from node a to node b: (the client's seconds or "stalled", "<bytes> <seconds>" as
    node b received them)."""
    server = nodes.popen(1, [sys.executable, "-c", SERVER, nodes.ips[1]], stdout=subprocess.PIPE, text=True)
    client = nodes.popen(
        0, [sys.executable, "-c", CLIENT, nodes.ips[1], str(mib), str(timeout)], stdout=subprocess.PIPE, text=True
    )
    if cut_after is not None:
        time.sleep(cut_after)
        nodes.cut()
    sent, _ = client.communicate(timeout=60)
    try:
        received, _ = server.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        received = "none"
    return sent.strip(), received.strip()


def test_the_link_runs_at_its_shaped_rate_and_a_cut_stalls_it(nodes):
    rate = nodes.rate_mbit
    _, received = _send(nodes, 8, timeout=30)
    count, seconds = received.split()
    mbit = int(count) * 8 / 1e6 / float(seconds)  # as received: the sender's buffers do not count
    print(f"8 MiB over the {rate} Mbit/s link: {float(seconds):.3f} s, {mbit:.1f} Mbit/s")
    assert int(count) == 8 << 20
    assert 0.7 * rate < mbit < 1.2 * rate  # tbf's rate, not the bare veth's

    nodes.shape(None)  # unshaped: much faster
    _, received = _send(nodes, 8, timeout=30)
    assert int(received.split()[0]) * 8 / 1e6 / float(received.split()[1]) > 3 * rate

    nodes.shape(rate)
    stalled, received = _send(nodes, 64, timeout=3, cut_after=1.0)  # 13 s at 40 Mbit/s: cut mid-transfer
    assert stalled == "stalled" and not received.startswith(str(64 << 20))
    nodes.restore()


def test_close_deletes_the_namespaces_and_what_ran_in_them():
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    with TwoNodes() as two:
        sleeper = two.popen(1, ["sleep", "300"])
        names = two.names
        assert all(IFNAME in subprocess.run(["ip", "-n", n, "link"], capture_output=True, text=True).stdout for n in names)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in listed for n in names)
    assert sleeper.poll() is not None
