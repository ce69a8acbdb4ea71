"""The cluster side of starting a run: reaching Ray, and whether what the run asks for (training workers,
validation actors) fits the cluster, now, after a bounded wait for it to grow, or never. The decision
itself is orchestrator.core.policy.fit_decision; this module gathers the facts and waits."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from relay_train.config import TrainConfig
from relay_train.exit_codes import Exit

from orchestrator.core.cluster import ClusterConfig
from orchestrator.core.failure import FatalError
from orchestrator.core.policy import Ask, describe, fit_decision, place, share_cpus

log = logging.getLogger(__name__)


class ResourceError(FatalError):
    """The run asks for what the cluster cannot give: never (a fixed cluster: CONFIG), or not within the
    wait (FAILED: a later try may find it grown)."""

    def __init__(self, message: str, retryable: bool):
        super().__init__(Exit.FAILED if retryable else Exit.CONFIG, message)
        self.retryable = retryable


class RunInUseError(ResourceError):
    """Another launch or job holds this run (its storage folder's lock, or its named steward)."""

    def __init__(self, message: str):
        super().__init__(message, retryable=False)
        self.code = Exit.IN_USE


def validation_gpus(config: TrainConfig, cluster: ClusterConfig, cluster_gpus: float) -> float:
    """GPUs per validation actor: validation_num_gpus, or 0 on a cluster without GPUs when
    validation_cpu_fallback says the CPU will do (the local demo). Without that key an autoscaling
    cluster waits for its GPU nodes rather than rendering on the CPU."""
    if config.validation_num_gpus > 0 and not cluster_gpus and cluster.validation_cpu_fallback:
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
    if config.validation_every > 0:
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


def fit_cpus(config: TrainConfig, cluster: ClusterConfig, nodes: list[dict[str, float]], gpus: float) -> ClusterConfig | None:
    """On a cluster that cannot grow, the workers and validation actors that ask for at most one CPU each
    share the CPUs there are (policy.share_cpus, as `relay demo` sizes itself): the cluster config they fit
    with, or None when sharing does not make them fit (a GPU, a custom resource, more than one CPU asked)."""
    if cluster.cpus_per_worker > 1 or cluster.validation_cpus > 1:
        return None  # asked for on purpose: never shrunk
    actors = sum(ask.count for ask in run_asks(config, cluster, gpus))
    share = share_cpus(sum(n.get("CPU", 0) for n in nodes), actors)  # fit_decision then checks each node
    if share <= 0:
        return None
    fitted = cluster.model_copy(
        update={"cpus_per_worker": min(cluster.cpus_per_worker, share), "validation_cpus": min(cluster.validation_cpus, share)}
    )
    return fitted if fit_decision(run_asks(config, fitted, gpus), nodes, False).fits else None


def wait_until_it_fits(
    config: TrainConfig, cluster: ClusterConfig, can_grow: bool, poll: float = 5.0, say_every: float = 30.0
) -> tuple[float, ClusterConfig]:
    """Check the run's request against the cluster before anything starts; returns the GPUs each
    validation actor asks for and the cluster config it fits with. A fixed cluster shares its CPUs
    (fit_cpus) or, when that cannot help, is a ResourceError at once; a growing one is waited for, up to
    resource_wait_seconds: one line saying what for, then one every `say_every` seconds."""
    start = time.monotonic()
    said: float | None = None  # when the last waiting line was written
    fallback_said = False
    while True:
        nodes = node_resources()
        gpus = validation_gpus(config, cluster, sum(n.get("GPU", 0) for n in nodes))
        if gpus != config.validation_num_gpus and not fallback_said:
            log.warning(
                "validation_num_gpus=%g but the cluster has no GPU: validation actors run on the CPU (validation_cpu_fallback)",
                config.validation_num_gpus,
            )
            fallback_said = True
        asks = run_asks(config, cluster, gpus)
        decision = fit_decision(asks, nodes, can_grow)
        if decision.fits:
            return gpus, cluster
        if not decision.wait:
            fitted = fit_cpus(config, cluster, nodes, gpus)
            if fitted is None:
                raise ResourceError(decision.message, retryable=False)
            log.info(
                "the cluster has %g CPU(s): each training worker takes %g CPU and each validation actor %g "
                "(cpus_per_worker and validation_cpus, shared as they fit)",
                sum(n.get("CPU", 0) for n in nodes),
                fitted.cpus_per_worker,
                fitted.validation_cpus,
            )
            return gpus, fitted
        waited = time.monotonic() - start
        if waited >= cluster.resource_wait_seconds:
            raise ResourceError(
                f"waited {cluster.resource_wait_seconds:g} s for the cluster to grow: " + decision.message, retryable=True
            )
        if said is None:
            log.warning("waiting up to %g s for the cluster to grow: %s", cluster.resource_wait_seconds, decision.message)
            said = waited
        elif waited - said >= say_every:
            missing = place(asks, nodes)
            log.info(
                "waiting %.0f s of %g for %s for the %s",
                waited,
                cluster.resource_wait_seconds,
                describe(missing.bundle) if missing else "room",
                missing.what if missing else "run",
            )
            said = waited
        time.sleep(poll)


def cluster_can_grow(cluster: ClusterConfig) -> bool:
    """Whether waiting can help: autoscaling true, or auto on a joined cluster (RAY_ADDRESS) that has an
    autoscaler: one the cluster launcher started (its ~/ray_bootstrap_config.yaml on the head, where a
    submitted job's driver runs) or KubeRay's. A `ray start --head` cluster, or a local one this process
    started, holds what it holds."""
    if cluster.autoscaling != "auto":
        return bool(cluster.autoscaling)
    if not os.environ.get("RAY_ADDRESS"):
        return False
    return Path(AUTOSCALER_CONFIG).expanduser().is_file() or KUBERAY_AUTOSCALER in os.environ


AUTOSCALER_CONFIG = "~/ray_bootstrap_config.yaml"  # written on the head by `ray up`, read by its autoscaler
KUBERAY_AUTOSCALER = "RAY_USAGE_STATS_KUBERAY_IN_USE"  # set by KubeRay in its pods


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
        # a new local cluster, as documented: never a `ray start` cluster that happens to run on this machine
        # (ray.init() without an address would join it, with its resources and its other jobs)
        kwargs.update(address="local", include_dashboard=False)
    try:
        ray.init(**kwargs)
    except ConnectionError as exc:
        raise ResourceError(
            f"cannot reach the Ray cluster at RAY_ADDRESS={os.environ.get('RAY_ADDRESS')}: "
            f"{str(exc).splitlines()[0][:300]}. Start it (ray start --head) or unset RAY_ADDRESS "
            "to run on a local cluster",
            retryable=True,
        ) from exc
