"""The cluster section: how many workers, where checkpoints live, how failures are tolerated.

A small JSON file of its own (`configs/*/cluster.json`), so the SimpleTuner config stays unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

from pydantic import AfterValidator, ConfigDict, Field

from relay_train.config.files import read_json
from relay_train.config.names import check_path_part
from relay_train.config.problems import ConfigError, ConfigModel, Where, built, field_problems, with_defaults

MAX_BUCKET_MB = 4096  # a bucket past this is a typo (bytes for MiB?); the seed's whole adapter is ~760 MiB


def _workers(value: int | tuple[int, int]) -> int | tuple[int, int]:
    low, high = (value, value) if isinstance(value, int) else value
    if not 1 <= low <= high:
        raise ValueError("num_workers must be >= 1, or [min, max] with 1 <= min <= max")
    return value


def _bucket(value: float) -> float:
    if not 0 < value <= MAX_BUCKET_MB:
        raise ValueError(
            f"gradient_bucket_mb must be in (0, {MAX_BUCKET_MB}] MiB. 25 (the default) suits most links; "
            "smaller starts traffic earlier in backward, larger makes fewer calls"
        )
    return value


# cluster keys that are Ray Train settings, and the environment variables Ray Train reads them from
RAY_TRAIN_VARIABLES = {
    "report_poll_seconds": "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
    "worker_start_seconds": "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S",
}

Workers = Annotated[int | tuple[int, int], AfterValidator(_workers)]
BucketMiB = Annotated[float, AfterValidator(_bucket)]


class ClusterConfig(ConfigModel):
    model_config = ConfigDict(extra="forbid")

    num_workers: Workers = Field(1, description="data-parallel training workers (one per GPU); [min, max] for an elastic run")
    use_gpu: bool = Field(False, description="one GPU per worker; NCCL instead of gloo")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs reserved per worker")
    resources_per_worker: dict[str, float] = Field(default_factory=dict, description="extra custom resources per worker")
    storage_path: str = Field(
        "output/ray", description="s3://bucket/prefix or a local folder; runs live under <storage_path>/<run_name>"
    )
    storage_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, moto, R2...)")
    run_name: Annotated[str | None, AfterValidator(check_path_part)] = Field(
        None, description="defaults to tracker_run_name, then the output_dir's name"
    )
    max_failures: int = Field(3, ge=-1, description="worker-group restarts after failures (-1: unlimited)")
    max_preemption_failures: int = Field(-1, ge=-1, description="restarts after preemptions (-1: unlimited)")
    strategy: Literal["ddp", "deepspeed"] = Field("ddp", description="how adapter gradients are synced")
    gradient_bucket_mb: BucketMiB = Field(
        25.0, description="ddp: MiB of gradients per all-reduce, launched while backward still runs (as DDP's bucket_cap_mb)"
    )
    gradient_sync_dtype: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="ddp: what the all-reduce sends; bf16 "
        "halves the bytes (gradients still accumulate in fp32) "
        "but the 1-vs-N-worker equality becomes approximate",
    )
    collective_timeout_seconds: float = Field(
        1800.0,
        gt=0,
        description="how long a collective (a gradient "
        "all-reduce) waits for a peer before the group fails and Ray restarts "
        "it from the last checkpoint (torch.distributed's timeout)",
    )
    upload_mode: Literal["async", "sync"] = Field("async", description="checkpoint upload: async never blocks the loop")
    elastic_resize_seconds: float = Field(
        60.0, gt=0, description="elastic runs: how often Ray looks for room to grow the group back"
    )
    preemption_check_steps: int = Field(
        1,
        ge=0,
        description="steps between preemption checks (a ~4 ms barrier; "
        "0: never). 1 suits second-long steps; raise it for tiny fast ones",
    )
    validation_resources: dict[str, float] = Field(
        default_factory=dict,
        description="custom resources each "
        'validation actor asks for, e.g. {"validation_gpu": 1}: '
        "it lands on validation nodes, never on training GPUs",
    )
    validation_cpus: float = Field(
        1.0, gt=0, description="CPUs each validation actor reserves (the demo shares a small machine: fractions are fine)"
    )
    validation_cpu_fallback: bool = Field(
        False,
        description="on a cluster without GPUs, render validation on the CPU instead of waiting for GPU nodes (the local demo)",
    )
    autoscaling: bool | Literal["auto"] = Field(
        "auto",
        description="whether the cluster can grow: a request that "
        "does not fit then waits (resource_wait_seconds) instead of failing "
        "at once. auto: yes when joining a cluster (RAY_ADDRESS), no for a "
        "local one this command starts",
    )
    resource_wait_seconds: float = Field(
        900.0, ge=0, description="how long a run that does not fit yet waits for an autoscaling cluster to grow before it fails"
    )
    hourly_price_worker: float = Field(0.0, ge=0, description="$/h of one training worker's instance (cost estimate)")
    hourly_price_head: float = Field(0.0, ge=0, description="$/h of the head node (cost estimate)")
    steward_poll_seconds: float = Field(5.0, gt=0, description="how often the steward looks for committed checkpoints")
    stall_seconds: float | None = Field(
        None,
        gt=0,
        description="seconds without a recorded step before `relay status` calls the run stalled and, with a node "
        "of its group gone, the steward alerts that it waits for capacity; default: 20 steps' time, at least 60 s",
    )
    report_poll_seconds: float = Field(
        0.5,
        gt=0,
        description="how often Ray Train's controller polls the workers; each poll takes one reported "
        "checkpoint and checks the workers' health (Ray's own 2 s lets reports queue behind fast steps, "
        "holding a run's end and an emergency checkpoint's commit)",
    )
    worker_start_seconds: float = Field(
        60.0,
        gt=0,
        description="how long a worker group may take to be placed and start before Ray decides its size "
        "again (an elastic run that lost a node shrinks after at most this)",
    )

    @classmethod
    def cross_field_problems(cls, values: Mapping[str, Any], bad: set[str]) -> list[str]:
        """Problems between keys; a check is skipped when one of its keys already failed."""
        if (
            not bad & {"strategy", "gradient_sync_dtype"}
            and values["strategy"] == "deepspeed"
            and values["gradient_sync_dtype"] != "fp32"
        ):
            return [
                f"'gradient_sync_dtype': {values['gradient_sync_dtype']!r} applies to strategy 'ddp' only. "
                "DeepSpeed reduces the gradients itself: its own options are zero_optimization.overlap_comm "
                "(reduce buckets while backward runs) and communication_data_type 'bf16' (reduce in bf16). "
                "Leave gradient_sync_dtype at 'fp32' with strategy 'deepspeed', or use strategy 'ddp'"
            ]
        return []

    def ray_train_environment(self, environ: Mapping[str, str]) -> dict[str, str]:
        """Ray Train's own knobs for these keys (environment variables its controller and workers read):
        a key written in the cluster config wins, then the variable already in `environ`, then our default."""
        out = {}
        for key, variable in RAY_TRAIN_VARIABLES.items():
            if key in self.model_fields_set or variable not in environ:
                out[variable] = f"{getattr(self, key):g}"
        return out

    @property
    def hourly_cost(self) -> float | None:
        cost = self.hourly_price_head + self.max_workers * self.hourly_price_worker
        return cost or None

    @property
    def elastic(self) -> bool:
        return not isinstance(self.num_workers, int)

    @property
    def max_workers(self) -> int:
        """The global batch is sized for this many workers, whatever the group's size (see build_trainer)."""
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]

    @property
    def is_s3(self) -> bool:
        return self.storage_path.startswith("s3://")


def load_cluster_config(path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> ClusterConfig:
    """Read a cluster.json (none: the defaults) with `--cluster-set` overrides; every problem is reported
    together, worded as a training config's are, in one ConfigError."""
    source = path or "the cluster config"
    raw, problems = read_json(Path(path)) if path else ({}, [])
    if raw is None:
        raise ConfigError(problems, source)
    if not isinstance(raw, dict):
        raise ConfigError([f'the cluster config must be a JSON object of "key": value, got {type(raw).__name__}'], source)
    raw = {**raw, **(overrides or {})}
    good, found = field_problems(ClusterConfig, raw, Where())
    problems += found + ClusterConfig.cross_field_problems(with_defaults(ClusterConfig, good), set(raw) - set(good))
    if problems:
        raise ConfigError(problems, source)
    return built(ClusterConfig, good)


def storage_filesystem(cluster: ClusterConfig):
    """(pyarrow filesystem or None, storage_path as Ray wants it). S3 honours an endpoint override."""
    if not cluster.is_s3:
        return None, str(Path(cluster.storage_path).expanduser().resolve())
    from relay_train.data.store import s3_filesystem

    parsed = urlparse(cluster.storage_path)
    return s3_filesystem(cluster.storage_endpoint_url), f"{parsed.netloc}{parsed.path}".rstrip("/")


def assigned_cpus() -> float | None:
    """The CPUs Ray gave the calling worker or actor (its num_cpus); None in a driver, or an actor that asked none."""
    import ray

    if not ray.is_initialized():  # checked first: the runtime context would start a local Ray instance
        return None
    context = ray.get_runtime_context()
    if context.worker.mode != ray.WORKER_MODE:
        return None
    return context.get_assigned_resources().get("CPU")
