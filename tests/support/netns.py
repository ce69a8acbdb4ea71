"""Two "nodes" on one machine: two Linux network namespaces joined by a veth pair, the link shaped with tc.

A truer multi-node cluster than ray.cluster_utils: every byte between the nodes (torch's gloo, Ray's
own control and object traffic) crosses one link with a bandwidth limit, and the link can be cut.

    with TwoNodes(rate_mbit=200) as nodes:          # namespaces + veth + tbf on both ends
        with RayOnTwoNodes(nodes) as ray_nodes:           # a Ray head in node a, a worker in node b
            ray_nodes.run_driver([python, script, ...], timeout=300)  # the driver runs inside node a
            nodes.cut()                              # `ip link set down`: the link goes dead

Addresses are a private /30 on the veth pair, inside the namespaces made here: nothing outside this
machine is reachable and nothing else on it can reach them. Needs root and `ip netns`; `unavailable()`
says why not (tests skip with it). Every wait is bounded; `close()` kills every process left in the
namespaces and deletes them, also after a failure.

Delay: `delay_ms` needs the kernel's netem qdisc. Kernels without it (this CI machine's) shape by rate
only; asking for a delay there raises NetnsUnavailable.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

IFNAME = "relay0"  # the same interface name in both namespaces: one GLOO_SOCKET_IFNAME fits every node
ADDRESSES = ("10.231.0.1", "10.231.0.2")  # a /30 that exists only inside these two namespaces
COMMAND_TIMEOUT = 30.0


class NetnsUnavailable(RuntimeError):
    """This machine cannot build the namespaces (not root, no iproute2, no permission, no qdisc)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=check)


def unavailable() -> str | None:
    """Why two namespaces cannot be made here, or None when they can (probes with a throwaway one)."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip") or not shutil.which("tc"):
        return "iproute2 (ip, tc) is not installed"
    probe = f"relay-probe-{uuid.uuid4().hex[:8]}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` is not permitted here: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


class TwoNodes:
    """Namespaces `<tag>-a` and `<tag>-b`, a veth pair between them named IFNAME on both sides, addressed
    ADDRESSES[0] and ADDRESSES[1]; each end's egress limited to `rate_mbit` (tbf) and delayed by
    `delay_ms` (netem), so both directions see the same link."""

    def __init__(self, rate_mbit: float | None = None, delay_ms: float = 0.0, burst_kb: int = 256):
        self.tag = f"relay-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.names = (f"{self.tag}-a", f"{self.tag}-b")
        self.ips = ADDRESSES
        self.rate_mbit, self.delay_ms, self.burst_kb = rate_mbit, delay_ms, burst_kb
        self.processes: list[subprocess.Popen] = []
        self.made: list[str] = []

    def __enter__(self) -> TwoNodes:
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        reason = unavailable()
        if reason:
            raise NetnsUnavailable(reason)
        for name in self.names:
            _ip("netns", "add", name)
            self.made.append(name)
            _ip("-n", name, "link", "set", "lo", "up")
        peer_a, peer_b = f"ra{uuid.uuid4().hex[:8]}", f"rb{uuid.uuid4().hex[:8]}"  # unique in the root namespace
        _ip("link", "add", peer_a, "netns", self.names[0], "type", "veth", "peer", "name", peer_b, "netns", self.names[1])
        for name, peer, ip in zip(self.names, (peer_a, peer_b), self.ips):
            _ip("-n", name, "link", "set", peer, "name", IFNAME)
            _ip("-n", name, "addr", "add", f"{ip}/30", "dev", IFNAME)
            _ip("-n", name, "link", "set", IFNAME, "up")
            # Ray finds a node's IP by connecting a UDP socket towards a public address (nothing is sent);
            # this route makes that pick the veth address. A packet that did follow it would reach the
            # other namespace, which forwards nothing: it never leaves the machine.
            _ip("-n", name, "route", "add", "default", "dev", IFNAME)
        self.shape(self.rate_mbit, self.delay_ms)

    def shape(self, rate_mbit: float | None, delay_ms: float = 0.0) -> None:
        """(Re)shape both ends: tbf at `rate_mbit` (None: unlimited), under netem `delay_ms` when > 0."""
        self.rate_mbit, self.delay_ms = rate_mbit, delay_ms
        for name in self.names:
            subprocess.run(
                ["tc", "-n", name, "qdisc", "del", "dev", IFNAME, "root"], capture_output=True, timeout=COMMAND_TIMEOUT
            )
            parent = ["root"]
            if delay_ms > 0:
                made = subprocess.run(
                    ["tc", "-n", name, "qdisc", "add", "dev", IFNAME, "root", "handle", "1:", "netem", "delay", f"{delay_ms}ms"],
                    capture_output=True,
                    text=True,
                    timeout=COMMAND_TIMEOUT,
                )
                if made.returncode != 0:
                    raise NetnsUnavailable(f"a link delay needs the netem qdisc: {made.stderr.strip()}")
                parent = ["parent", "1:", "handle", "2:"]
            if rate_mbit:
                # burst: bytes sent at line rate before the bucket throttles; latency: queue bound
                subprocess.run(
                    [
                        "tc",
                        "-n",
                        name,
                        "qdisc",
                        "add",
                        "dev",
                        IFNAME,
                        *parent,
                        "tbf",
                        "rate",
                        f"{rate_mbit}mbit",
                        "burst",
                        f"{self.burst_kb}kb",
                        "latency",
                        "200ms",
                    ],
                    check=True,
                    capture_output=True,
                    timeout=COMMAND_TIMEOUT,
                )

    def cut(self) -> None:
        """The link goes dead, as when a node drops off the network: no packet crosses, nothing closes."""
        _ip("-n", self.names[1], "link", "set", IFNAME, "down")

    def restore(self) -> None:
        _ip("-n", self.names[1], "link", "set", IFNAME, "up")

    # -- processes ------------------------------------------------------------------------------
    def popen(self, node: int, argv: list[str], env: dict | None = None, **kwargs) -> subprocess.Popen:
        """Start `argv` inside node `node` (0 or 1), in its own process group (closed with the nodes)."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.names[node], *argv], env={**os.environ, **(env or {})}, start_new_session=True, **kwargs
        )
        self.processes.append(proc)
        return proc

    def run(self, node: int, argv: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
        proc = self.popen(node, argv, env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, _ = proc.communicate(timeout=COMMAND_TIMEOUT)
            raise TimeoutError(f"{' '.join(argv[:3])}... ran over {timeout} s in node {node}:\n{out[-4000:]}") from None
        return subprocess.CompletedProcess(argv, proc.returncode, out, None)

    def close(self) -> None:
        """Kill what runs in the namespaces (ours by construction: `ip netns pids`), then delete them."""
        for proc in self.processes:
            _kill_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.processes:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill_group(proc)
        for name in self.made:
            for _ in range(3):  # a process may fork while we kill: a few bounded rounds
                pids = _ip("netns", "pids", name, check=False).stdout.split()
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except (ProcessLookupError, ValueError):
                        pass
                time.sleep(0.5)
            _ip("netns", "del", name, check=False)
        self.made = []
        for proc in self.processes:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.processes = []


def _kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class RayOnTwoNodes:
    """A Ray head in node a and a Ray worker node in node b, each on its veth address, with gloo bound to
    the veth (GLOO_SOCKET_IFNAME): Ray's and torch's traffic between them crosses the shaped link.

    Ports live in the namespaces, so they never clash with another Ray on this machine; `ray stop` is
    never called (it would stop every Ray here): the processes die with the namespaces.
    """

    PORT = 6379

    def __init__(
        self,
        nodes: TwoNodes,
        cpus: tuple[float, float] = (1, 1),
        resources: tuple[dict, dict] = ({}, {}),
        object_store_mb: int = 256,
        env: dict | None = None,
    ):
        self.nodes, self.cpus, self.resources = nodes, cpus, resources
        # Ray's session (sockets, logs) in a short folder of its own: unix socket paths are limited to 107
        # bytes; deleted with the cluster.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rn-", dir="/tmp"))
        self.object_store = object_store_mb * (1 << 20)
        # Token auth off: the cluster's only network is the veth pair inside these two namespaces.
        self.env = {"GLOO_SOCKET_IFNAME": IFNAME, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", **(env or {})}
        self.heads: list[subprocess.Popen] = []

    @property
    def address(self) -> str:
        return f"{self.nodes.ips[0]}:{self.PORT}"

    def __enter__(self) -> RayOnTwoNodes:
        try:
            self.start_node(0)
            self.start_node(1)
            self.wait_for_nodes(2, timeout=90)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.nodes.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def logged(self, text: str) -> bool:
        """Whether any Ray worker process has written `text` to its log."""
        return any(text in f.read_text(errors="replace") for f in self.temp_dir.glob("session_*/logs/worker-*"))

    def _ray(self) -> str:
        return str(Path(sys.executable).with_name("ray"))

    def start_node(self, node: int) -> subprocess.Popen:
        """`ray start --block` in `node` (the head in node 0). Call again for node 1 to replace a lost node."""
        common = [
            "--block",
            "--node-ip-address",
            self.nodes.ips[node],
            "--num-cpus",
            str(self.cpus[node]),
            "--resources",
            json.dumps(self.resources[node]),
            "--object-store-memory",
            str(self.object_store),
            "--disable-usage-stats",
        ]
        if node == 0:
            self.temp_dir.mkdir(parents=True, exist_ok=True)
            argv = [
                self._ray(),
                "start",
                "--head",
                "--port",
                str(self.PORT),
                "--include-dashboard",
                "false",
                "--temp-dir",
                str(self.temp_dir),
                *common,
            ]
        else:
            argv = [self._ray(), "start", "--address", self.address, *common]
        log = open(self.temp_dir / f"node-{node}-{len(self.heads)}.log", "w")
        proc = self.nodes.popen(node, argv, self.env, stdout=log, stderr=subprocess.STDOUT)
        self.heads.append(proc)
        if node == 0:
            self._wait_for_port(timeout=60)
        return proc

    def _wait_for_port(self, timeout: float) -> None:
        probe = (
            "import socket, sys, time\n"
            f"end = time.monotonic() + {timeout}\n"
            "while time.monotonic() < end:\n"
            "    try:\n"
            f"        socket.create_connection(('{self.nodes.ips[0]}', {self.PORT}), 1).close(); sys.exit(0)\n"
            "    except OSError:\n"
            "        time.sleep(0.3)\n"
            "sys.exit(1)\n"
        )
        if self.nodes.run(0, [sys.executable, "-c", probe], timeout=timeout + 10).returncode != 0:
            raise RuntimeError(
                f"the Ray head in {self.nodes.names[0]} did not listen within {timeout} s; see {self.temp_dir}/node-0-0.log"
            )

    def wait_for_nodes(self, count: int, timeout: float) -> None:
        """Until `count` nodes are alive (asked from inside node a)."""
        script = (
            "import ray, sys, time\n"
            f"ray.init(address='{self.address}', _node_ip_address='{self.nodes.ips[0]}', "
            "configure_logging=False, log_to_driver=False)\n"
            f"end = time.monotonic() + {timeout}\n"
            f"while sum(n['Alive'] for n in ray.nodes()) < {count} and time.monotonic() < end:\n"
            "    time.sleep(0.5)\n"
            f"sys.exit(0 if sum(n['Alive'] for n in ray.nodes()) >= {count} else 1)\n"
        )
        done = self.run_driver([sys.executable, "-c", script], timeout=timeout + 30)
        if done.returncode != 0:
            raise RuntimeError(f"fewer than {count} Ray nodes came up within {timeout} s:\n{done.stdout[-3000:]}")

    def run_driver(self, argv: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run a driver inside node a; it joins with ray.init(address=RAY_ADDRESS) (set here)."""
        return self.nodes.run(0, argv, timeout, env={**self.env, "RAY_ADDRESS": self.address, **(env or {})})
