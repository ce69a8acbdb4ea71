"""The validation pool on a local Ray: actors render committed checkpoints from storage (moto S3 or a folder),
restart when killed mid-validation, and the queue policy that keeps training from ever waiting."""

from __future__ import annotations

import json
import threading
import time

import pytest

from orchestrator.core.store import SNAPSHOT, RunStorage
from orchestrator.services.validation import (
    BENCHMARK,
    ValidationPool,
    ValidationService,
    enqueue,
    flat_scores,
    pending_validations,
    result_folder,
)
from relay_train import checkpoint as ckpt
from relay_train.config import load_config
from relay_train.trainer import build_trainer
from relay_train.validate.results import SCORES
from tests.integration.test_validate import write_config

POOL = dict(
    validation_steps=2,
    validation_num_inference_steps=2,
    validation_resolution="32x32",
    validation_prompt="a red circle",
    use_ema=True,
    ema_validation="comparison",
    ema_update_interval=1,
)


# ---------------------------------------------------------------- policies (no Ray)


def test_queue_newest_wins_and_the_benchmark_is_kept():
    queue: list = []
    assert enqueue(queue, 10, limit=2) == [] and enqueue(queue, 20, limit=2) == []
    assert enqueue(queue, BENCHMARK, limit=2) == [] and queue == [BENCHMARK, 10, 20]
    assert enqueue(queue, 30, limit=2) == [10]  # full: the oldest step is skipped
    assert queue == [BENCHMARK, 20, 30]
    assert enqueue(queue, 30, limit=2) == [] and queue == [BENCHMARK, 20, 30]  # already waiting


def test_pending_after_resume_are_unfinished_validation_steps():
    done = {4}
    assert pending_validations([2, 3, 4, 6, 6], every=2, done=done.__contains__) == [2, 6]
    assert pending_validations([2, 4], every=0, done=done.__contains__) == []  # validation off


# ---------------------------------------------------------------- on Ray


@pytest.fixture(scope="module")
def local_ray(s3_endpoint):
    """Started after the S3 credentials are in the environment, so the actors inherit them."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model, demo_data, tiny_clip):
    """Checkpoints 2 and 4 in a local run folder, listed in a Ray-style snapshot; returns (config path, storage root)."""
    folder = tmp_path_factory.mktemp("pool")
    path = write_config(folder, tiny_model, demo_data, evaluation_type="clip", validation_clip_model=str(tiny_clip), **POOL)
    root = folder / "runs"
    build_trainer(load_config(path), store=ckpt.LocalCheckpointStore(root / "run")).fit()
    (root / "run" / SNAPSHOT).write_text(
        json.dumps({"checkpoint_results": [{"checkpoint_dir_name": f"checkpoint-{s}"} for s in (2, 4)]})
    )
    return path, root


class Results:
    """on_result: records what reached the steward's side, and the thread it ran on."""

    def __init__(self):
        self.calls: list[tuple[int, dict, list[str]]] = []
        self.threads: set[str] = set()

    def __call__(self, step: int, summary: dict, images: list[tuple[str, bytes]]) -> None:
        assert all(data.startswith(b"\x89PNG") for _, data in images)
        self.calls.append((step, summary, [name for name, _ in images]))
        self.threads.add(threading.current_thread().name)


@pytest.mark.slow  # a Ray actor per test: ~20 s quiet, ~50 s on a busy 2-core machine
def test_pool_renders_each_validation_step_from_s3_and_loads_once(local_ray, trained_run, s3_endpoint, s3_bucket):
    path, root = trained_run
    _, bucket = s3_bucket
    storage = RunStorage(f"s3://{bucket}/runs", "run", endpoint_url=s3_endpoint)
    storage.upload_dir(root / "run", "")  # the run as Ray leaves it in S3: checkpoints + snapshot
    assert storage.checkpoint_steps() == [2, 4]

    results, ledger = Results(), []
    # as the steward runs it: the run's first event queues the benchmark and what storage lacks (2, 4)
    service = ValidationService.for_run(
        path, storage, record=lambda *a, **kw: ledger.append((a, kw)), forward=results, num_actors=1
    ).start()
    pool = service.pool
    try:
        started = time.perf_counter()
        service.on_event({"type": "run_started"})
        service.on_event({"type": "checkpoint", "step": 4})  # already queued: not twice
        assert not pool.submit(3)  # not a validation step
        assert time.perf_counter() - started < 0.5  # hand-overs only touch the queue (and list storage once)
        assert pool.wait_idle(timeout=240), pool.failed
        assert pool.loads() == [1]  # one actor, one pipeline load, three validations
    finally:
        assert service.close(timeout=10)

    assert [c[0] for c in results.calls] == [0, 2, 4] and results.threads == {"validation-pool"}
    assert [(a, kw["benchmark"]) for a, kw in ledger] == [
        (("validation", 0), True),
        (("validation", 2), False),
        (("validation", 4), False),
    ]
    assert set(flat_scores(results.calls[1][1])) == {
        f"{v}/clip_{s}" for v in ("adapter", "ema") for s in ("min", "mean", "max", "std")
    }
    for step, summary, names in results.calls:
        folder = result_folder(BENCHMARK if step == 0 else step)
        stored = storage.read_json(f"{folder}/{SCORES}")
        assert stored == summary and summary["location"] == storage.describe(folder)
        expected = ["base"] if step == 0 else ["adapter", "ema"]
        assert summary["variants"] == expected
        assert names == [f"{v}-validation-seed42-32x32.png" for v in expected] + ["grid.png"]
        assert set(storage.listdir(folder)) == {*names, SCORES}
    assert pool.pending_after_resume([2, 4]) == []
    storage.delete(f"{result_folder(4)}/{SCORES}")  # as if a preemption cut checkpoint-4's validation short
    assert pool.pending_after_resume(storage.checkpoint_steps()) == [4]


@pytest.mark.slow
def test_an_actor_killed_mid_validation_is_replaced_and_the_step_rerun(local_ray, trained_run):
    path, root = trained_run
    storage = RunStorage(str(root), "run")
    results = Results()
    # 2 variants x 3 sizes: the kill lands after the first image and before the sixth
    sizes = {"validation_resolution": "32x32,48x48,64x64", "validation_num_inference_steps": 4}
    pool = ValidationPool(path, sizes, storage, on_result=results, num_actors=1).start()
    try:
        first = pool.actors[0]
        assert pool.loads() == [1]  # the actor is up (pipeline loaded) before the job arrives
        assert pool.submit(2)
        deadline = time.monotonic() + 60
        while local_ray.get(first.progress.remote()) < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        local_ray.kill(first)
        assert not storage.exists(f"{result_folder(2)}/{SCORES}"), "validation finished before the kill"
        assert pool.wait_idle(timeout=240), pool.failed
        assert pool.restarts == 1 and pool.actors[0] != first
        assert pool.completed == [2] and not pool.failed
        assert pool.loads() == [1]
    finally:
        pool.close(timeout=10)
    assert [c[0] for c in results.calls] == [2]  # re-run once, reported once: none lost
    assert storage.read_json(f"{result_folder(2)}/{SCORES}")["step"] == 2
