"""The cluster section: how many workers, where checkpoints live, how failures are tolerated.

A small JSON file of its own (`configs/*/cluster.json`), so the SimpleTuner config stays unchanged.
"""

from __future__ import annotations

import json
from difflib import get_close_matches
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from relay_train.config import ConfigError

MAX_BUCKET_MB = 4096  # a bucket past this is a typo (bytes for MiB?); the seed's whole adapter is ~760 MiB


class ClusterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_workers: int | tuple[int, int] = Field(1, description="data-parallel training workers (one per GPU); "
                                               "[min, max] for an elastic run")
    use_gpu: bool = Field(False, description="one GPU per worker; NCCL instead of gloo")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs reserved per worker")
    resources_per_worker: dict[str, float] = Field(default_factory=dict, description="extra custom resources per worker")
    storage_path: str = Field("output/ray", description="s3://bucket/prefix or a local folder; runs live under "
                              "<storage_path>/<run_name>")
    storage_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, moto, R2...)")
    run_name: str | None = Field(None, description="defaults to tracker_run_name, then the output_dir's name")
    max_failures: int = Field(3, ge=-1, description="worker-group restarts after failures (-1: unlimited)")
    max_preemption_failures: int = Field(-1, ge=-1, description="restarts after preemptions (-1: unlimited)")
    strategy: Literal["ddp", "deepspeed"] = Field("ddp", description="how adapter gradients are synced")
    gradient_bucket_mb: float = Field(25.0, description="ddp: MiB of gradients per all-reduce, "
                                      "launched while backward still runs (as DDP's bucket_cap_mb)")
    gradient_sync_dtype: Literal["fp32", "bf16"] = Field("fp32", description="ddp: what the all-reduce sends; bf16 "
                                                         "halves the bytes (gradients still accumulate in fp32) "
                                                         "but the 1-vs-N-worker equality becomes approximate")
    collective_timeout_seconds: float = Field(1800.0, gt=0, description="how long a collective (a gradient "
                                              "all-reduce) waits for a peer before the group fails and Ray restarts "
                                              "it from the last checkpoint (torch.distributed's timeout)")
    upload_mode: Literal["async", "sync"] = Field("async", description="checkpoint upload: async never blocks the loop")
    elastic_resize_seconds: float = Field(60.0, gt=0, description="elastic runs: how often Ray looks for room "
                                          "to grow the group back")
    preemption_check_steps: int = Field(1, ge=0, description="steps between preemption checks (a ~4 ms barrier; "
                                        "0: never). 1 suits second-long steps; raise it for tiny fast ones")
    validation_resources: dict[str, float] = Field(default_factory=dict, description="custom resources each "
                                                   "validation actor asks for, e.g. {\"validation_gpu\": 1}: "
                                                   "it lands on validation nodes, never on training GPUs")
    validation_cpus: float = Field(1.0, gt=0, description="CPUs each validation actor reserves (the demo shares "
                                   "a small machine: fractions are fine)")
    validation_cpu_fallback: bool = Field(False, description="on a cluster without GPUs, render validation on "
                                          "the CPU instead of waiting for GPU nodes (the local demo)")
    autoscaling: bool | Literal["auto"] = Field("auto", description="whether the cluster can grow: a request that "
                                                "does not fit then waits (resource_wait_seconds) instead of failing "
                                                "at once. auto: yes when joining a cluster (RAY_ADDRESS), no for a "
                                                "local one this command starts")
    resource_wait_seconds: float = Field(900.0, ge=0, description="how long a run that does not fit yet waits for "
                                         "an autoscaling cluster to grow before it fails")
    hourly_price_worker: float = Field(0.0, ge=0, description="$/h of one training worker's instance (cost estimate)")
    hourly_price_head: float = Field(0.0, ge=0, description="$/h of the head node (cost estimate)")
    steward_poll_seconds: float = Field(5.0, gt=0, description="how often the steward looks for committed checkpoints")

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, value):
        low, high = (value, value) if isinstance(value, int) else value
        if not 1 <= low <= high:
            raise ValueError(f"num_workers must be >= 1, or [min, max] with 1 <= min <= max; got {value}")
        return value

    @field_validator("gradient_bucket_mb")
    @classmethod
    def _bucket(cls, value):
        if not 0 < value <= MAX_BUCKET_MB:
            raise ValueError(f"gradient_bucket_mb must be in (0, {MAX_BUCKET_MB}] MiB; got {value}. 25 (the default) "
                             "suits most links; smaller starts traffic earlier in backward, larger makes fewer calls")
        return value

    @field_validator("gradient_sync_dtype")
    @classmethod
    def _sync_dtype(cls, value, info):
        if info.data.get("strategy") == "deepspeed" and value != "fp32":
            raise ValueError(
                "gradient_sync_dtype 'bf16' applies to strategy 'ddp' only. DeepSpeed reduces the gradients itself: "
                "its own options are zero_optimization.overlap_comm (reduce buckets while backward runs) and "
                "communication_data_type 'bf16' (reduce in bf16). Leave gradient_sync_dtype at 'fp32' with "
                "strategy 'deepspeed', or use strategy 'ddp'")
        return value

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


def load_cluster_config(path: str | Path | None, overrides: dict | None = None) -> ClusterConfig:
    raw = json.loads(Path(path).read_text()) if path else {}
    raw.update(overrides or {})
    known = list(ClusterConfig.model_fields)
    unknown = [k for k in raw if k not in known]
    problems = [f"unknown cluster key {k!r}" + (f": did you mean {m[0]!r}?" if (m := get_close_matches(k, known, 1)) else "")
                for k in unknown]
    try:
        config = ClusterConfig(**{k: v for k, v in raw.items() if k in known})
    except ValidationError as exc:
        problems += [f"cluster key {'.'.join(map(str, e['loc']))!r}: got {e.get('input')!r}; {e['msg']}" for e in exc.errors()]
        config = None
    if problems:
        raise ConfigError(problems, source=path or "the cluster config")
    return config


def storage_filesystem(cluster: ClusterConfig):
    """(pyarrow filesystem or None, storage_path as Ray wants it). S3 honours an endpoint override."""
    if not cluster.is_s3:
        return None, str(Path(cluster.storage_path).expanduser().resolve())
    from relay_train.data.store import s3_filesystem

    parsed = urlparse(cluster.storage_path)
    return s3_filesystem(cluster.storage_endpoint_url), f"{parsed.netloc}{parsed.path}".rstrip("/")
