"""Loopback ports for servers and Ray nodes that tests start, so two of them never collide."""

from __future__ import annotations

import random
import socket


def free_port() -> int:
    """A free port between Ray's worker ports (10002-19999) and the kernel's ephemeral range (32768+): a port
    the kernel hands out for port 0 or an outgoing connection could be taken again between this check and
    the caller's bind, one below that range only by another explicit pick."""
    for _ in range(200):
        port = random.randint(20000, 32000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port in 20000-32000")


def ray_node_ports() -> list[str]:
    """`ray start` flags for every per-node port Ray would otherwise take at a fixed default (the dashboard
    agent's 52365, ...): two nodes on one machine, or two clusters there (xdist's lanes), must not collide;
    an agent that loses 52365 stays up without the HTTP service that job submission needs."""
    return [
        f"--{name}={free_port()}"
        for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")
    ]
