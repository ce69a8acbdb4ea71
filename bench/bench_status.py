"""How long `relay status` takes, as a person runs it, for a run with 300 checkpoints and 300 validations
in its ledger: local storage and moto's S3 server on loopback, one tree or two side by side.

    python bench/bench_status.py                      # this tree
    python bench/bench_status.py --before /tmp/old    # and an older tree (git archive REV | tar -x -C /tmp/old)

Each figure is the median wall time of --repeat runs of `python -m orchestrator.cli status RUN --storage S
--no-hub` in a fresh process (imports included: that is what a person waits for).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN, EVENTS = "bench", 300


def ledger_lines(events: int) -> bytes:
    """A 300k-step run's ledger: a start, an attempt, then a checkpoint and a validation every 1000 steps."""
    t0 = time.time() - events * 600
    lines = [
        {"time": t0, "type": "run_started", "world_size": 8, "total_steps": 300_000},
        {"time": t0 + 60, "type": "attempt", "step": 0, "world_size": 8, "total_steps": 300_000, "reason": "fresh"},
    ]
    for i in range(1, events + 1):
        step = 1000 * i
        lines.append({"time": t0 + 600 * i, "type": "checkpoint", "step": step, "uri": f"checkpoint-{step}"})
        scores = {"ema": {"mean": 0.3, "min": 0.2, "max": 0.4}}
        lines.append({"time": t0 + 600 * i + 30, "type": "validation", "step": step, "scores": scores})
    return "".join(json.dumps(e, sort_keys=True) + "\n" for e in lines).encode()


def files(events: int) -> dict[str, bytes]:
    """Every file the run folder holds that status may read: Ray's snapshot naming the newest 5 checkpoints,
    their manifests and configs, the progress file and one scores.json per validation."""
    steps = [1000 * i for i in range(events - 4, events + 1)]
    out = {
        "relay/ledger.jsonl": ledger_lines(events),
        "relay/progress.json": json.dumps({"step": steps[-1], "time": time.time(), "steps_per_second": 0.58}).encode(),
        "checkpoint_manager_snapshot.json": json.dumps(
            {"checkpoint_results": [{"checkpoint_dir_name": f"checkpoint-{s}"} for s in steps]}
        ).encode(),
    }
    for s in steps:
        out[f"checkpoint-{s}/manifest.json"] = json.dumps({"format": 1, "step": s, "files": {}}).encode()
        out[f"checkpoint-{s}/config.json"] = json.dumps({"push_to_hub": False}).encode()
    for i in range(1, events + 1):
        scores = {"scores": {"ema": {"mean": 0.3, "min": 0.2, "max": 0.4}}, "images": ["a.png"], "grid": "grid.png"}
        out[f"relay/validation/checkpoint-{1000 * i}/scores.json"] = json.dumps(scores).encode()
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def timed(tree: Path, storage: str, endpoint: str | None, repeat: int, env: dict) -> tuple[float, float, str]:
    """(median wall seconds, median CPU seconds of the process, its first line). The CPU time is what the
    command itself costs; the wall time adds whatever else the machine is doing."""
    import resource

    command = [sys.executable, "-m", "orchestrator.cli", "status", RUN, "--storage", storage, "--no-hub"]
    command += ["--endpoint", endpoint] if endpoint else []
    walls, cpus, first = [], [], ""
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        got = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=300)
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        if got.returncode != 0:
            raise SystemExit(f"{tree}: status failed ({got.returncode}): {got.stderr[-2000:]}")
        first = first or got.stdout.splitlines()[0]
    return statistics.median(walls), statistics.median(cpus), first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="an older tree to time beside this one")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request

    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._port}"
    try:
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket="bench")
        local = Path(tempfile.mkdtemp(prefix="relay-status-bench-"))
        for key, data in files(EVENTS).items():
            s3.put_object(Bucket="bench", Key=f"runs/{RUN}/{key}", Body=data)
            (local / RUN / key).parent.mkdir(parents=True, exist_ok=True)
            (local / RUN / key).write_bytes(data)
        trees = [("before", args.before)] if args.before else []
        trees.append(("after", REPO))
        print(f"relay status, {EVENTS} checkpoint + {EVENTS} validation events, median of {args.repeat}:", flush=True)
        for name, tree in trees:
            for where, storage, url in (("local", str(local), None), ("S3 (moto)", "s3://bench/runs", endpoint)):
                wall, cpu, line = timed(tree, storage, url, args.repeat, env)
                print(f"  {name:6} {where:9} wall {wall:6.2f} s  cpu {cpu:5.2f} s   {line}", flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
