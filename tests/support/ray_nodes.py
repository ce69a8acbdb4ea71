"""`ray start` command lines for the nodes tests start as processes (the acceptance layer's heads and nodes)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

from support import ports

NODE_COMMON = ["--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]

# For a head whose tests kill nodes outright: its GCS checks each node every second and counts one dead
# after 3 failed checks (~3 s after a SIGKILL), where Ray's defaults (3 s x 5) take ~15 s.
QUICK_NODE_DEATH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}


def head_command(ray: str, port: int, dashboard: int, temp: str, node_ports: list[str] | None = None) -> list[str]:
    """`ray start --head --block` on loopback with 2 CPUs, the dashboard (the job API) on `dashboard`, and
    every other port its own (`node_ports`: fixed ones, for a head that must come back where it was)."""
    return [
        ray,
        "start",
        "--head",
        f"--port={port}",
        "--num-cpus=2",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--temp-dir={temp}",
        *(node_ports if node_ports is not None else [f"--ray-client-server-port={ports.free_port()}", *ports.ray_node_ports()]),
        *NODE_COMMON,
    ]


def stop_group(proc: subprocess.Popen, grace: float = 30) -> None:
    """Stop a `ray start --block` started in its own process group: SIGTERM (the node leaves its cluster
    cleanly), then SIGKILL after `grace` s to whatever of the group is still there."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
