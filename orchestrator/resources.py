"""The cluster side of starting a run: reaching Ray, and whether what the run asks for (training workers,
validation actors) fits the cluster, now, after a bounded wait for it to grow, or never. The decision
itself is orchestrator.policy.fit_decision; this module gathers the facts and waits."""

from __future__ import annotations

import logging
import os
import time

from relay_train.config import TrainConfig

from orchestrator.cluster import ClusterConfig
from orchestrator.policy import Ask, fit_decision

log = logging.getLogger(__name__)


class ResourceError(RuntimeError):
    """The run asks for what the cluster cannot give: never (a fixed cluster), or not within the wait."""

    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


def validation_gpus(config: TrainConfig, cluster: ClusterConfig, cluster_gpus: float) -> float:
    """GPUs per validation actor: validation_num_gpus, or 0 on a cluster without GPUs when
    validation_cpu_fallback says the CPU will do (the local demo). Without that key an autoscaling
    cluster waits for its GPU nodes rather than rendering on the CPU."""
    if config.validation_num_gpus > 0 and not cluster_gpus and cluster.validation_cpu_fallback:
        log.warning(
            "validation_num_gpus=%g but the cluster has no GPU: validation actors run on the CPU (validation_cpu_fallback)",
            config.validation_num_gpus,
        )
        return 0.0
    return config.validation_num_gpus


def run_asks(config: TrainConfig, cluster: ClusterConfig, gpus_per_validator: float) -> list[Ask]:
    """What the run will ask Ray for: the training workers and the validation actors (the steward and
    Ray Train's controller take no CPU)."""
    worker = {"CPU": cluster.cpus_per_worker, **({"GPU": 1.0} if cluster.use_gpu else {}), **cluster.resources_per_worker}
    asks = [
        Ask(
            "training worker",
            cluster.num_workers if isinstance(cluster.num_workers, int) else cluster.num_workers[0],
            worker,
            "num_workers, cpus_per_worker, use_gpu or resources_per_worker",
        )
    ]
    if config.validation_steps > 0:
        validator = {
            "CPU": cluster.validation_cpus,
            **({"GPU": gpus_per_validator} if gpus_per_validator else {}),
            **cluster.validation_resources,
        }
        asks.append(
            Ask(
                "validation actor",
                config.validation_actors,
                validator,
                "validation_cpus or validation_resources (cluster config), validation_actors or "
                "validation_num_gpus (config; validation_cpu_fallback lets a GPU-less cluster render on the CPU)",
            )
        )
    return asks


def node_resources() -> list[dict[str, float]]:
    import ray

    return [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]


def wait_until_it_fits(config: TrainConfig, cluster: ClusterConfig, can_grow: bool, poll: float = 5.0) -> float:
    """Check the run's request against the cluster before anything starts; returns the GPUs each
    validation actor asks for. A fixed cluster that can never hold it is a ResourceError at once; a
    growing one is waited for, up to resource_wait_seconds, with a line saying what for."""
    deadline = time.monotonic() + cluster.resource_wait_seconds
    said = None
    while True:
        nodes = node_resources()
        gpus = validation_gpus(config, cluster, sum(n.get("GPU", 0) for n in nodes))
        decision = fit_decision(run_asks(config, cluster, gpus), nodes, can_grow)
        if decision.fits:
            return gpus
        if not decision.wait:
            raise ResourceError(decision.message, retryable=False)
        if time.monotonic() >= deadline:
            raise ResourceError(
                f"waited {cluster.resource_wait_seconds:g} s for the cluster to grow: " + decision.message, retryable=True
            )
        if decision.message != said:
            log.warning("waiting up to %g s for the cluster to grow: %s", cluster.resource_wait_seconds, decision.message)
            said = decision.message
        time.sleep(poll)


def local_cpus() -> float:
    """The CPUs a local Ray cluster started here would have (Ray counts the cgroup's limit, as here)."""
    from ray._private.utils import get_num_cpus

    return float(get_num_cpus())


def cluster_can_grow(cluster: ClusterConfig) -> bool:
    """Whether waiting can help: autoscaling true, or auto on a cluster this process joined (RAY_ADDRESS);
    a local cluster this process started holds what it holds."""
    if cluster.autoscaling != "auto":
        return bool(cluster.autoscaling)
    return bool(os.environ.get("RAY_ADDRESS"))


def quiet_requested(verbose: bool) -> bool:
    """Ray's own chatter and the actors' logs reach this terminal only with --verbose or a RAY_* log setting."""
    return not verbose and not any(k in os.environ for k in ("RAY_LOGGING_LEVEL", "RAY_BACKEND_LOG_LEVEL"))


def check_reachable(address: str | None, timeout: float = 5.0) -> None:
    """One TCP connect to RAY_ADDRESS's host:port before ray.init, which would otherwise retry for minutes
    with a screenful of warnings. "auto", "local" and ray:// client addresses are left to Ray."""
    from urllib.parse import urlparse

    if not address or address in ("auto", "local") or address.startswith("ray://"):
        return
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if not parsed.hostname or not parsed.port:
        return
    import socket

    try:
        socket.create_connection((parsed.hostname, parsed.port), timeout=timeout).close()
    except OSError as exc:
        raise ResourceError(
            f"cannot reach the Ray cluster at RAY_ADDRESS={address}: {exc.strerror or exc}. Start "
            "it (ray start --head) or unset RAY_ADDRESS to run on a local cluster",
            retryable=True,
        ) from exc


def connect(verbose: bool = False) -> None:
    """Join RAY_ADDRESS's cluster (a submitted job) or start a local one. The workers' and actors' own logs
    stay in Ray's session folder unless asked for: this terminal shows the progress line and milestones."""
    import ray

    check_reachable(os.environ.get("RAY_ADDRESS"))
    quiet = quiet_requested(verbose)
    kwargs = {"log_to_driver": not quiet, "logging_level": logging.ERROR if quiet else logging.INFO}
    if not os.environ.get("RAY_ADDRESS"):
        kwargs["include_dashboard"] = False
    try:
        ray.init(**kwargs)
    except ConnectionError as exc:
        raise ResourceError(
            f"cannot reach the Ray cluster at RAY_ADDRESS={os.environ.get('RAY_ADDRESS')}: "
            f"{str(exc).splitlines()[0][:300]}. Start it (ray start --head) or unset RAY_ADDRESS "
            "to run on a local cluster",
            retryable=True,
        ) from exc
