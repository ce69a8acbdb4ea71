"""The spot-notice agent: one per worker node. It drains its own Ray node with reason PREEMPTION and the
time left whenever the node is about to be taken, so Ray Train sees it (`get_preemption_info`) and the
loop checkpoints before the node goes. Ray drains a node only when told to; nothing else tells it.

The ways a node is taken, and what the agent hears of each:
- AWS spot reclaim (IMDSv2): PUT /latest/api/token, then GET /latest/meta-data/spot/instance-action:
  404 until a reclaim is scheduled, then {"action": "terminate"|"stop"|"hibernate", "time": "...Z"}
  ~2 min ahead.
- AWS rebalance recommendation: GET /latest/meta-data/events/recommendations/rebalance, 404 until the
  instance is at elevated risk, then {"noticeTime": "...Z"}. EKS managed node groups (capacity
  rebalancing), Karpenter and the Node Termination Handler evict pods on it, often before any
  instance-action; the agent drains with REBALANCE_NOTICE_SECONDS, the soonest a reclaim can follow.
- An eviction or shutdown: SIGTERM to the agent (or `--drain-now` from a Kubernetes preStop hook), with
  the grace the pod or unit has left (`--sigterm-grace`).
- GCP: GET /computeMetadata/v1/instance/preempted (Metadata-Flavor: Google): "FALSE", then "TRUE" with
  about 30 s left (a GKE Spot pod gets about 15 s of them: docs/runbook.md §5).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, UTC

log = logging.getLogger(__name__)

AWS_ENDPOINT = "http://169.254.169.254"
GCP_ENDPOINT = "http://metadata.google.internal"
GCP_NOTICE_SECONDS = 30  # GCP gives no time, only the fact; spot VMs get about this long
REBALANCE_NOTICE_SECONDS = 120  # a rebalance recommendation carries no deadline; a reclaim notice gives 2 min
AWS_TOKEN_TTL = 21600


@dataclass
class Notice:
    cloud: str
    action: str
    deadline: float  # epoch seconds
    raw: str

    def seconds_left(self, now: float | None = None) -> float:
        return self.deadline - (now or time.time())

    @classmethod
    def sigterm(cls, grace: float, received_at: float | None = None) -> Notice:
        """The node is being shut down (an eviction, a stopped unit): `grace` seconds from the signal."""
        received_at = received_at or time.time()
        return cls("signal", "sigterm", received_at + grace, f"SIGTERM, {grace:.0f} s grace")


class MetadataError(RuntimeError):
    """The metadata service answered something we cannot read."""


def _request(url: str, method: str = "GET", headers: dict | None = None, timeout: float = 2.0) -> tuple[int, str]:
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


class AwsSpot:
    cloud = "aws"

    def __init__(self, endpoint: str = AWS_ENDPOINT, rebalance: bool = True):
        self.endpoint, self.token, self.token_at = endpoint.rstrip("/"), None, 0.0
        self.rebalance = rebalance

    def available(self) -> bool:
        try:
            self._token(refresh=True)
            return True
        except (OSError, MetadataError):
            return False

    def _token(self, refresh: bool = False) -> str:
        if refresh or self.token is None or time.time() - self.token_at > AWS_TOKEN_TTL / 2:
            status, body = _request(
                f"{self.endpoint}/latest/api/token", "PUT", {"X-aws-ec2-metadata-token-ttl-seconds": str(AWS_TOKEN_TTL)}
            )
            if status != 200:
                raise MetadataError(f"IMDSv2 token request answered {status}")
            self.token, self.token_at = body.strip(), time.time()
        return self.token

    def _get(self, path: str) -> tuple[int, str]:
        status, body = _request(f"{self.endpoint}{path}", headers={"X-aws-ec2-metadata-token": self._token()})
        if status == 401:  # token expired early: take a new one next time
            self.token = None
        return status, body

    def poll(self) -> Notice | None:
        """The reclaim notice if there is one, else the rebalance recommendation (if watched), else None."""
        notice = self._read("/latest/meta-data/spot/instance-action", "time")
        if notice is None and self.rebalance:
            notice = self._read("/latest/meta-data/events/recommendations/rebalance", "noticeTime", REBALANCE_NOTICE_SECONDS)
        return notice

    def _read(self, path: str, time_key: str, ahead: float = 0.0) -> Notice | None:
        """One IMDS document: 404 means nothing scheduled. A reclaim's deadline is its time field; a
        recommendation's is `ahead` seconds after it was issued."""
        status, body = self._get(path)
        if status in (401, 404):
            return None
        if status != 200:
            raise MetadataError(f"{path} answered {status}")
        try:
            data = json.loads(body)
            when = datetime.fromisoformat(data[time_key].replace("Z", "+00:00")).astimezone(UTC).timestamp()
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise MetadataError(f"unreadable {path}: {body[:200]!r}") from exc
        if time_key == "time":
            return Notice("aws", data.get("action", "terminate"), when, body)
        # A recommendation seen late (the agent restarted) still gets the whole window from now.
        return Notice("aws", "rebalance", max(when, time.time()) + ahead, body)


class GcpSpot:
    cloud = "gcp"

    def __init__(self, endpoint: str = GCP_ENDPOINT):
        self.endpoint = endpoint.rstrip("/")

    def _get(self) -> tuple[int, str]:
        return _request(f"{self.endpoint}/computeMetadata/v1/instance/preempted", headers={"Metadata-Flavor": "Google"})

    def available(self) -> bool:
        try:
            return self._get()[0] == 200
        except OSError:
            return False

    def poll(self) -> Notice | None:
        status, body = self._get()
        if status != 200:
            raise MetadataError(f"instance/preempted answered {status}")
        if body.strip().upper() != "TRUE":
            return None
        return Notice("gcp", "preempt", time.time() + GCP_NOTICE_SECONDS, body)


def detect_cloud(aws_endpoint: str = AWS_ENDPOINT, gcp_endpoint: str = GCP_ENDPOINT, cloud: str = "auto", rebalance: bool = True):
    """The metadata source for this machine, or None when neither answers."""
    sources = {"aws": AwsSpot(aws_endpoint, rebalance), "gcp": GcpSpot(gcp_endpoint)}
    if cloud != "auto":
        return sources[cloud]
    for source in sources.values():
        if source.available():
            return source
    return None


def drain_node(gcs_address: str, node_id: str, notice: Notice) -> None:
    """Ask Ray's GCS to drain `node_id` for a preemption with the notice's deadline (what `ray drain-node
    --reason DRAIN_NODE_REASON_PREEMPTION` does).

    Ray 2.60 has no public drain API: `ray drain-node` is a hidden CLI "not covered by Ray's public API
    stability guarantees" that makes this same GcsClient.drain_node call (ray/scripts/scripts.py), as do
    the autoscaler and Ray's own SIGTERM handler (ray/_private/node.py). Calling it directly skips a
    process start and a version check inside the notice window; tests/integration/test_preemption.py
    pins its behaviour against the installed Ray."""
    import ray
    from ray.core.generated import autoscaler_pb2

    gcs = ray._raylet.GcsClient(address=gcs_address)
    message = json.dumps({"source": "relay-spot-agent", "cloud": notice.cloud, "action": notice.action})
    accepted, why = gcs.drain_node(
        node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"), message, int(notice.deadline * 1000)
    )
    if not accepted:
        raise RuntimeError(f"Ray refused to drain node {node_id[:12]}: {why}")


def _connect(gcs_address: str) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=gcs_address, logging_level=logging.WARNING, log_to_driver=False)


def local_node_id(gcs_address: str) -> str:
    """This machine's Ray node: the alive node whose IP is ours (one Ray node per machine in production)."""
    import ray
    from ray.util import get_node_ip_address

    ip = get_node_ip_address()
    _connect(gcs_address)
    mine = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeManagerAddress"] == ip]
    if len(mine) != 1:
        raise RuntimeError(f"found {len(mine)} alive Ray nodes at {ip}; pass --node-id with the one to drain")
    return mine[0]


def hold_until_released(gcs_address: str, node_id: str, deadline: float, poll: float = 2.0) -> bool:
    """Wait until no actor is alive on `node_id` (Ray Train has moved its workers off) or the deadline.
    A Kubernetes preStop hook runs this so the Ray container stays up while the emergency checkpoint is
    written: the container gets its SIGTERM only when the hook returns. True when the node emptied."""
    from ray.util.state import list_actors

    _connect(gcs_address)
    while time.time() < deadline:
        try:
            alive = list_actors(filters=[("node_id", "=", node_id), ("state", "=", "ALIVE")], raise_on_missing_output=False)
        except Exception as exc:  # the state API is best effort here: keep holding to the deadline
            log.warning("spot agent: cannot list the node's actors (%s); holding to the deadline", str(exc)[:200])
            alive = [None]
        if not alive:
            return True
        time.sleep(min(poll, max(0.0, deadline - time.time())))
    return False


def watch_sigterm() -> threading.Event:
    """An event set on SIGTERM (an eviction, `systemctl stop`, a shutdown), for run_agent to act on."""
    import signal

    received = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: received.set())
    return received


def run_agent(
    source,
    gcs_address: str,
    node_id: str,
    interval: float = 5.0,
    max_polls: int | None = None,
    drain=drain_node,
    sigterm: threading.Event | None = None,
    sigterm_grace: float = 0.0,
) -> Notice | None:
    """Poll until a notice or a SIGTERM (then drain and return the notice) or max_polls. Metadata hiccups
    are logged and retried. `source` None: no metadata service, only the signal."""
    sigterm = sigterm or threading.Event()
    polls = 0
    log.info("spot agent: watching %s for node %s every %.0f s", getattr(source, "cloud", "SIGTERM"), node_id[:12], interval)
    while max_polls is None or polls < max_polls:
        polls += 1
        notice = None
        if sigterm.is_set():
            notice = Notice.sigterm(sigterm_grace)
        elif source is not None:
            try:
                notice = source.poll()
            except (OSError, MetadataError) as exc:
                log.warning("spot agent: metadata poll failed (%s); retrying", exc)
        if notice is not None:
            log.warning(
                "spot agent: %s notice: %s in %.0f s; draining node %s",
                notice.cloud,
                notice.action,
                notice.seconds_left(),
                node_id[:12],
            )
            drain(gcs_address, node_id, notice)
            return notice
        sigterm.wait(interval)  # a SIGTERM ends the wait at once
    return None
