"""Ray orchestration figures (issue 4), side by side in one run.

    python bench/bench_ray.py steps  [--steps 300]   # (a) 1-worker Ray run vs `relay train`, same config
    python bench/bench_ray.py upload [--mib 350]     # (b) loop blocked per checkpoint: ASYNC vs SYNC upload to S3
    python bench/bench_ray.py preemption [--calls 200]  # cost of one get_preemption_info barrier, 2 workers
    python bench/bench_ray.py commits [--steps 150] [--rounds 2]
        # checkpoint commits and the run's end: report_poll_seconds 2 (Ray's own poll) vs 0.5 (ours)
    python bench/bench_ray.py overlap [--rate-mbit 120] [--rounds 5] [--steps 2] [--bucket-mb 1]
        # gradient all-reduce blocking vs overlapped with backward, two nodes over a shaped link
        # (bench/bench_overlap.py; needs root and `ip netns`)

(a) compares steps/s between checkpoints (every 50 steps; the intervals after the first checkpoint,
so start-up is excluded on both sides).
(b) reports, through our CheckpointReporter, a checkpoint padded to --mib to moto's S3 server on
loopback, three times per mode, with 3 s of busy "training" between; it prints how long each report
call held the loop.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def bench_steps(steps: int) -> None:
    import ray

    from orchestrator.core.cluster import ClusterConfig
    from orchestrator.run.launch import launch
    from relay_train.config import load_config
    from relay_train.trainer import Hooks, build_trainer

    with tempfile.TemporaryDirectory() as tmp:
        overrides = {
            "max_train_steps": steps,
            "checkpointing_steps": 50,
            "output_dir": f"{tmp}/single",
            "resume_from_checkpoint": "none",
        }
        marks: list[tuple[int, float]] = []
        trainer = build_trainer(
            load_config(REPO / "configs/demo/config.json", overrides),
            hooks=Hooks(on_checkpoint=lambda step, _: marks.append((step, time.perf_counter()))),
        )
        trainer.fit()
        single = [(b[0] - a[0]) / (b[1] - a[1]) for a, b in zip(marks, marks[1:])]

        ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
        # 2 CPUs for the worker: Ray sets its OMP_NUM_THREADS from them, matching the single process
        cluster = ClusterConfig(num_workers=1, cpus_per_worker=2, storage_path=f"{tmp}/runs", run_name="bench", max_failures=0)
        result = launch(REPO / "configs/demo/config.json", {**overrides, "output_dir": f"{tmp}/ray"}, cluster)
        ray.shutdown()
        rates = [metrics["steps_per_second"] for _, metrics in result.best_checkpoints]
    s, r = statistics.median(single), statistics.median(rates)
    print(f"relay train (single process): {s:.2f} steps/s  intervals {[round(x, 1) for x in single]}")
    print(f"ray, 1 worker:                {r:.2f} steps/s  intervals {[round(x, 1) for x in rates]}")
    print(f"ratio ray/single: {r / s:.3f}")


def upload_train_fn(config: dict) -> None:

    from orchestrator.run.worker import CheckpointReporter

    reporter, blocked = CheckpointReporter(config["mode"]), []
    for step in (1, 2, 3):
        end = time.perf_counter() + 3.0
        while time.perf_counter() < end:  # "training": the work an async upload should overlap
            sum(i * i for i in range(10_000))
        folder = Path(tempfile.mkdtemp()) / f"checkpoint-{step}"
        folder.mkdir()
        with open(folder / "adapter.safetensors", "wb") as fh:
            for _ in range(config["mib"]):
                fh.write(os.urandom(1 << 20))
        start = time.perf_counter()
        reporter(step, folder)
        blocked.append(time.perf_counter() - start)
    Path(config["out"]).write_text(json.dumps(blocked))


def bench_upload(mib: int) -> None:
    import boto3
    import ray
    from moto.server import ThreadedMotoServer
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.core.cluster import ClusterConfig, storage_filesystem

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=5391, verbose=False)
    server.start()
    endpoint = "http://127.0.0.1:5391"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("sync", "async"):
            cluster = ClusterConfig(storage_path="s3://bench/runs", storage_endpoint_url=endpoint)
            fs, path = storage_filesystem(cluster)
            out = Path(tmp) / f"{mode}.json"
            t0 = time.perf_counter()
            TorchTrainer(
                upload_train_fn,
                train_loop_config={"mode": mode, "mib": mib, "out": str(out)},
                scaling_config=ScalingConfig(num_workers=1),
                run_config=RunConfig(
                    name=f"upload-{mode}",
                    storage_path=path,
                    storage_filesystem=fs,
                    checkpoint_config=CheckpointConfig(num_to_keep=2),
                ),
            ).fit()
            figures[mode] = (json.loads(out.read_text()), time.perf_counter() - t0)
    ray.shutdown()
    server.stop()
    for mode, (blocked, total) in figures.items():
        print(
            f"{mode:>5}: loop blocked per {mib} MiB checkpoint {statistics.mean(blocked):.3f} s "
            f"(each: {', '.join(f'{b:.3f}' for b in blocked)}), whole run {total:.1f} s"
        )
    print(f"ratio sync/async blocked time: {statistics.mean(figures['sync'][0]) / statistics.mean(figures['async'][0]):.1f}x")


def preemption_train_fn(config: dict) -> None:
    """Each rank times `calls` preemption checks (a barrier) and as many fire-and-forget steward ticks."""
    import ray.train

    from orchestrator.run.steward import get_steward

    checks, ticks = [], []
    for _ in range(config["calls"]):
        start = time.perf_counter()
        ray.train.get_preemption_info()
        checks.append(time.perf_counter() - start)
    steward = get_steward("bench")
    for step in range(config["calls"]):
        start = time.perf_counter()
        steward.tick.remote(step)
        ticks.append(time.perf_counter() - start)
    rank = ray.train.get_context().get_world_rank()
    Path(config["out"]).with_suffix(f".{rank}.json").write_text(json.dumps({"checks": checks, "ticks": ticks}))


def bench_preemption(calls: int) -> None:
    import ray
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.run.steward import RunSteward, steward_name
    from orchestrator.core.store import RunStorage

    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    with tempfile.TemporaryDirectory() as tmp:
        steward = RunSteward.options(name=steward_name("bench")).remote(RunStorage(tmp, "bench"), poll_seconds=60)
        ray.get(steward.ready.remote())
        out = Path(tmp) / "times"
        TorchTrainer(
            preemption_train_fn, train_loop_config={"calls": calls, "out": str(out)}, scaling_config=ScalingConfig(num_workers=2)
        ).fit()
        figures = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("times.*.json"))]
    ray.shutdown()
    checks = [t for f in figures for t in f["checks"][10:]]  # after warm-up
    ticks = [t for f in figures for t in f["ticks"][10:]]
    check_ms, tick_ms = 1000 * statistics.median(checks), 1000 * statistics.median(ticks)
    print(
        f"get_preemption_info, 2 workers: median {check_ms:.2f} ms, p90 "
        f"{1000 * statistics.quantiles(checks, n=10)[-1]:.2f} ms, max {1000 * max(checks):.2f} ms"
    )
    print(f"steward.tick.remote (fire and forget): median {tick_ms:.3f} ms, max {1000 * max(ticks):.3f} ms")
    for step_s in (0.06, 2.0):  # the tiny CPU demo's step; an SD3.5M step at 1024² (estimate, issue 10)
        for every in (1, 10):
            print(f"  step {step_s:>4} s, check every {every:>2} steps: overhead {100 * check_ms / 1000 / (every * step_s):.2f}%")


def bench_commits(steps: int, rounds: int) -> None:
    """A 1-worker run on a local cluster, a checkpoint every 10 steps, with Ray Train's controller polling
    every 2 s (its default) and every 0.5 s (report_poll_seconds), alternating. From the run's ledger: how
    long the run went on after its last step was trained (the export) until it completed, i.e. the reports
    still queued behind the loop, and the whole run's wall time."""
    import ray

    from orchestrator.core.cluster import ClusterConfig
    from orchestrator.core.ledger import Ledger
    from orchestrator.core.store import RunStorage
    from orchestrator.run.launch import launch

    from bench_train import ensure_demo

    ensure_demo()
    figures: dict[float, list[tuple[float, float]]] = {2.0: [], 0.5: []}
    with tempfile.TemporaryDirectory() as tmp:
        ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
        for round_ in range(rounds):
            for poll in figures:
                name = f"poll-{poll:g}-{round_}"
                overrides = {"max_train_steps": steps, "checkpointing_steps": 10, "validation_steps": 0}
                overrides |= {"output_dir": f"{tmp}/{name}", "resume_from_checkpoint": "none"}
                cluster = ClusterConfig(
                    num_workers=1, cpus_per_worker=2, storage_path=f"{tmp}/runs", run_name=name, report_poll_seconds=poll
                )
                start = time.perf_counter()
                assert launch(REPO / "configs/demo/config.json", overrides, cluster).error is None
                wall = time.perf_counter() - start
                events = Ledger(RunStorage(f"{tmp}/runs", name)).events
                trained = next(e["time"] for e in events if e["type"] == "exported")
                done = next(e["time"] for e in events if e["type"] == "completed")
                figures[poll].append((done - trained, wall))
        ray.shutdown()
    for poll, runs in figures.items():
        tail, wall = (statistics.median(run[i] for run in runs) for i in range(2))
        print(
            f"report_poll_seconds {poll:>3g}: {tail:.1f} s from the last step to completed, "
            f"{wall:.1f} s whole run (medians of {len(runs)})"
        )
    slow, fast = (statistics.median(run[0] for run in figures[p]) for p in (2.0, 0.5))
    print(f"ratio of the time after the last step, 2 s / 0.5 s: {slow / max(fast, 1e-9):.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["steps", "upload", "preemption", "overlap", "commits"])
    parser.add_argument(
        "--steps", type=int, default=None, help="steps: 300; commits: 150; overlap: timed steps per mode and round, 2"
    )
    parser.add_argument("--mib", type=int, default=350)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rate-mbit", type=float, default=120.0, help="overlap: the link's rate, each way")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds of every mode (overlap: 5, commits: 2)")
    parser.add_argument("--bucket-mb", type=float, default=1.0, help="overlap: gradient_bucket_mb")
    args = parser.parse_args()
    if args.what == "steps":
        bench_steps(args.steps or 300)
    elif args.what == "overlap":
        from bench_overlap import bench_overlap

        bench_overlap(args.rate_mbit, args.rounds or 5, args.steps or 2, args.bucket_mb)
    elif args.what == "commits":
        bench_commits(args.steps or 150, args.rounds or 2)
    elif args.what == "upload":
        bench_upload(args.mib)
    else:
        bench_preemption(args.calls)
