"""Steps/s of `relay train`'s loop on the demo recipe under two CPU thread settings, on a quiet machine and
beside two busy processes, side by side (runs alternate to share the machine's noise).

Settings: torch's default (one intra-op thread per core it sees) against relay_train/threads.py's policy for
a process given 1 CPU (1 thread: what a demo worker with 0.66 CPU, or a 2-core share, gets). The busy
neighbours are single-threaded spin loops, so they load the cores the same way under either setting.

    python bench/bench_threads.py [--steps 40] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import REPO, ensure_demo, relay_run  # noqa: E402  (the same loop and data as bench_train)

from relay_train.logs import configure_logging  # noqa: E402

SETTINGS = {"default": None, "policy-1cpu": 1.0}  # cpus given to the process; None leaves torch's default
SPIN = "while True: pass"


def child(setting: str, steps: int) -> None:
    import torch

    from relay_train.threads import size_threads

    configure_logging()
    logging.getLogger().setLevel(logging.WARNING)
    if SETTINGS[setting] is not None:
        size_threads(given_cpus=SETTINGS[setting])
    with tempfile.TemporaryDirectory() as tmp:
        rate = relay_run(steps, Path(tmp))
    print(json.dumps({"setting": setting, "threads": torch.get_num_threads(), "steps_per_s": rate}))


def measure(setting: str, steps: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", setting, "--steps", str(steps)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", choices=sorted(SETTINGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.steps)
    ensure_demo()
    measure("default", 10)  # encode the demo's caches once, outside the timed runs
    results: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.rounds):
        for load in ("quiet", "2 busy"):
            neighbours = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(2 if load == "2 busy" else 0)]
            try:
                for setting in SETTINGS:
                    results.setdefault((load, setting), []).append(measure(setting, args.steps))
            finally:
                for proc in neighbours:
                    proc.kill()
                    proc.wait()
    print(f"{'machine':<10}{'setting':<14}{'threads':>8}{'steps/s (median)':>18}   per-round")
    for (load, setting), runs in results.items():
        rate = statistics.median(r["steps_per_s"] for r in runs)
        rounds = ", ".join(f"{r['steps_per_s']:.1f}" for r in runs)
        print(f"{load:<10}{setting:<14}{runs[0]['threads']:>8}{rate:>18.2f}   {rounds}")


if __name__ == "__main__":
    main()
