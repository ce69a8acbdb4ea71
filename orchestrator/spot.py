"""The spot-notice agent: one per worker node. It polls the cloud's metadata service for a reclaim
notice and, on one, drains its own Ray node with reason PREEMPTION and the notice's deadline, so Ray
Train sees it (`get_preemption_info`) and the loop checkpoints before the node goes.

Ray drains a node only when told to; on a plain EC2 or GCE cluster nothing else tells it.

AWS (IMDSv2): PUT /latest/api/token, then GET /latest/meta-data/spot/instance-action: 404 until a
reclaim is scheduled, then {"action": "terminate"|"stop"|"hibernate", "time": "2026-...Z"} ~2 min ahead.
GCP: GET /computeMetadata/v1/instance/preempted (Metadata-Flavor: Google): "FALSE", then "TRUE" with
about 30 s left.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, UTC

log = logging.getLogger(__name__)

AWS_ENDPOINT = "http://169.254.169.254"
GCP_ENDPOINT = "http://metadata.google.internal"
GCP_NOTICE_SECONDS = 30  # GCP gives no time, only the fact; spot VMs get about this long
AWS_TOKEN_TTL = 21600


@dataclass
class Notice:
    cloud: str
    action: str
    deadline: float  # epoch seconds
    raw: str

    def seconds_left(self, now: float | None = None) -> float:
        return self.deadline - (now or time.time())


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

    def __init__(self, endpoint: str = AWS_ENDPOINT):
        self.endpoint, self.token, self.token_at = endpoint.rstrip("/"), None, 0.0

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

    def poll(self) -> Notice | None:
        status, body = _request(
            f"{self.endpoint}/latest/meta-data/spot/instance-action", headers={"X-aws-ec2-metadata-token": self._token()}
        )
        if status == 401:  # token expired early: take a new one next time
            self.token = None
            return None
        if status == 404:
            return None
        if status != 200:
            raise MetadataError(f"spot/instance-action answered {status}")
        try:
            data = json.loads(body)
            when = datetime.fromisoformat(data["time"].replace("Z", "+00:00")).astimezone(UTC).timestamp()
        except (ValueError, KeyError, TypeError) as exc:
            raise MetadataError(f"unreadable spot/instance-action: {body[:200]!r}") from exc
        return Notice("aws", data.get("action", "terminate"), when, body)


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


def detect_cloud(aws_endpoint: str = AWS_ENDPOINT, gcp_endpoint: str = GCP_ENDPOINT, cloud: str = "auto"):
    """The metadata source for this machine, or None when neither answers."""
    sources = {"aws": AwsSpot(aws_endpoint), "gcp": GcpSpot(gcp_endpoint)}
    if cloud != "auto":
        return sources[cloud]
    for source in sources.values():
        if source.available():
            return source
    return None


def drain_node(gcs_address: str, node_id: str, notice: Notice) -> None:
    """Ask Ray's GCS to drain `node_id` for a preemption with the notice's deadline (what `ray drain-node
    --reason DRAIN_NODE_REASON_PREEMPTION` does)."""
    import ray
    from ray.core.generated import autoscaler_pb2

    gcs = ray._raylet.GcsClient(address=gcs_address)
    message = json.dumps({"source": "relay-spot-agent", "cloud": notice.cloud, "action": notice.action})
    accepted, why = gcs.drain_node(
        node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"), message, int(notice.deadline * 1000)
    )
    if not accepted:
        raise RuntimeError(f"Ray refused to drain node {node_id[:12]}: {why}")


def local_node_id(gcs_address: str) -> str:
    """This machine's Ray node: the alive node whose IP is ours (one Ray node per machine in production)."""
    import ray
    from ray._private.services import get_node_ip_address

    ip = get_node_ip_address()
    if not ray.is_initialized():
        ray.init(address=gcs_address, logging_level=logging.WARNING, log_to_driver=False)
    mine = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeManagerAddress"] == ip]
    if len(mine) != 1:
        raise RuntimeError(f"found {len(mine)} alive Ray nodes at {ip}; pass --node-id")
    return mine[0]


def run_agent(
    source, gcs_address: str, node_id: str, interval: float = 5.0, max_polls: int | None = None, drain=drain_node
) -> Notice | None:
    """Poll until a notice (then drain and return it) or max_polls. Metadata hiccups are logged and retried."""
    polls = 0
    log.info("spot agent: watching %s for node %s every %.0f s", source.cloud, node_id[:12], interval)
    while max_polls is None or polls < max_polls:
        polls += 1
        try:
            notice = source.poll()
        except (OSError, MetadataError) as exc:
            log.warning("spot agent: metadata poll failed (%s); retrying", exc)
            notice = None
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
        time.sleep(interval)
    return None
