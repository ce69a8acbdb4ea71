"""The worker spec: what launch tells every Ray Train worker, typed and picklable."""

from __future__ import annotations

import dataclasses
import os
import pickle
from pathlib import Path

from ray import cloudpickle
import pytest

from orchestrator.core.cluster import ClusterConfig
from orchestrator.run.launch import worker_spec
from orchestrator.core.store import RunStorage
from orchestrator.run.worker import WorkerSpec


@pytest.fixture
def spec(tmp_path: Path) -> WorkerSpec:
    # every knob away from its default, so a field filled from the wrong source shows
    cluster = ClusterConfig(
        num_workers=(2, 4),
        strategy="ddp",
        gradient_bucket_mb=8.0,
        gradient_sync_dtype="bf16",
        upload_mode="sync",
        preemption_check_steps=7,
    )
    storage = RunStorage(str(tmp_path / "runs"), "run-1", "http://127.0.0.1:9")
    return worker_spec("configs/tiny.json", {"max_train_steps": 3}, cluster, storage)


def test_launch_fills_every_field_of_the_spec(spec: WorkerSpec) -> None:
    expected = {
        "config_path": str(Path("configs/tiny.json").resolve()),
        "overrides": {"max_train_steps": 3},
        "working_dir": os.getcwd(),
        "upload_mode": "sync",
        "preemption_check_steps": 7,
        "global_workers": 4,
        "strategy": "ddp",
        "gradient_bucket_mb": 8.0,
        "gradient_sync_dtype": "bf16",
    }
    assert {f.name for f in dataclasses.fields(WorkerSpec)} == {*expected, "storage"}
    assert {name: getattr(spec, name) for name in expected} == expected
    assert spec.storage.describe() == RunStorage(spec.storage.storage_path, "run-1", "http://127.0.0.1:9").describe()
    assert spec.storage.endpoint_url == "http://127.0.0.1:9" and spec.storage.run_name == "run-1"


@pytest.mark.parametrize("pickler", [pickle, cloudpickle], ids=["pickle", "cloudpickle"])
def test_the_spec_survives_the_trip_to_a_worker(spec: WorkerSpec, pickler) -> None:
    back = pickler.loads(pickler.dumps({"spec": spec}))["spec"]  # as Ray ships train_loop_config
    assert isinstance(back, WorkerSpec) and back == spec
    assert (back.storage.describe(), back.storage.endpoint_url) == (spec.storage.describe(), spec.storage.endpoint_url)
    with pytest.raises(dataclasses.FrozenInstanceError):
        back.strategy = "deepspeed"  # type: ignore[misc]
