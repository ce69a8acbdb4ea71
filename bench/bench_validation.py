"""Training steps/s with the validation pool rendering every checkpoint vs without it, over the same steps,
and how long the training loop is blocked per validation hand-over (`ValidationPool.submit`).

The trainer runs in this process on the demo config; each checkpoint is written into a local run folder
with a Ray-style snapshot (as Ray Train leaves it), and with validation on, the checkpoint hook submits
the step to a one-actor pool (num_gpus 0) on a local Ray. On a CPU-only machine the actor's renders
share the cores with training, so the steps/s ratio also measures that contention; the blocked time is
the hand-over alone. Goal: blocked per validation <= one step's time.

    python bench/bench_validation.py [--steps 100] [--every 25]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from relay_train.logs import configure_logging  # noqa: E402

MODEL, DATA = REPO / "demo/tiny-sd3", REPO / "demo/data"
SNAPSHOT = "checkpoint_manager_snapshot.json"


def overrides(steps: int, every: int, out: Path) -> dict:
    return {
        "max_train_steps": steps,
        "checkpointing_steps": every,
        "validation_steps": every,
        "output_dir": str(out),
        "resume_from_checkpoint": "none",
        "checkpoints_total_limit": None,
        "validation_resolution": "64x64",
        "validation_num_inference_steps": 4,
        "evaluation_type": "none",
    }


def train(steps: int, every: int, run_dir: Path, pool=None) -> tuple[float, list[float]]:
    """(steps/s of Trainer.fit, seconds blocked in each submit)."""
    from relay_train import checkpoint as ckpt
    from relay_train.config import load_config
    from relay_train.trainer import Hooks, build_trainer

    config = load_config(REPO / "configs/demo/config.json", overrides(steps, every, run_dir / "out"))
    blocked: list[float] = []
    committed: list[int] = []

    def on_checkpoint(step: int, folder: Path | None) -> None:
        committed.append(step)  # what Ray's snapshot would list once the upload finished
        (run_dir / SNAPSHOT).write_text(
            json.dumps({"checkpoint_results": [{"checkpoint_dir_name": f"checkpoint-{s}"} for s in committed]})
        )
        if pool is not None:
            start = time.perf_counter()
            pool.submit(step)
            blocked.append(time.perf_counter() - start)

    trainer = build_trainer(config, hooks=Hooks(on_checkpoint=on_checkpoint), store=ckpt.LocalCheckpointStore(run_dir))
    start = time.perf_counter()
    trainer.fit()
    return steps / (time.perf_counter() - start), blocked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--every", type=int, default=25)
    args = parser.parse_args()
    configure_logging()
    logging.getLogger().setLevel(logging.WARNING)  # the bench's figures only: warnings and errors
    import ray

    from orchestrator.core.store import RunStorage
    from orchestrator.services.validation import ValidationPool
    from relay_train.demo.data import make_demo_dataset
    from relay_train.demo.tiny_model import make_pipeline

    if not (MODEL / "model_index.json").is_file():
        make_pipeline(MODEL)
    if not any(DATA.glob("*.txt")):
        make_demo_dataset(DATA)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train(args.every, args.every, root / "warm")  # builds the caches and warms up, untimed
        off, _ = train(args.steps, args.every, root / "off")
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            results: list[tuple[int, float]] = []
            pool = ValidationPool(
                REPO / "configs/demo/config.json",
                overrides(args.steps, args.every, root / "on" / "out"),
                RunStorage(str(root), "on"),
                on_result=lambda s, summary, _: results.append((s, summary["seconds"])),
                num_actors=1,
                num_gpus=0,
                working_dir=str(REPO),
            ).start()
            pool.loads()  # the actor's pipeline is loaded before timing starts
            on, blocked = train(args.steps, args.every, root / "on", pool=pool)
            drained = pool.wait_idle(timeout=300)
            pool.close(timeout=10)
        finally:
            ray.shutdown()
    step_ms = 1000 / on
    print(
        f"steps {args.steps}, checkpoint + validation every {args.every} (demo config, 1 prompt, 64x64, 4 sampler "
        f"steps, adapter + EMA)"
    )
    print(f"steps/s without validation: {off:.2f}")
    print(f"steps/s with the pool:      {on:.2f}  (ratio {on / off:.3f})")
    print(
        f"blocked per submit: mean {1000 * statistics.fmean(blocked):.3f} ms, max {1000 * max(blocked):.3f} ms "
        f"over {len(blocked)} submits; one step = {step_ms:.1f} ms (max/step = {1000 * max(blocked) / step_ms:.4f})"
    )
    print(
        f"validations finished: {len(results)} (steps {[s for s, _ in results]}), skipped: {pool.skipped}, "
        f"render seconds each: {[round(s, 2) for _, s in results]}; drained: {drained}"
    )


if __name__ == "__main__":
    main()
