"""`python bench/bench_ray.py overlap`: ddp's gradient all-reduce, blocking vs overlapped with backward,
on two Ray nodes in two network namespaces joined by a tc-shaped link (tests/support/netns.py).

The model: the tiny SD3 pipeline with its transformer widened to 512 (8 heads × 64; SD3.5 Medium
has 24 × 64 = 1536) over 8 layers, with the seed's LoKr config (configs/sd3/lycoris_config.json):
~6M trainable fp32 parameters (~24 MiB), ~0.8M a layer, in the seed's module pattern. Eight narrow
layers rather than two wide ones because backward produces a layer's gradients together: with two
layers the last one's attention (over a third of the adapter) is ready only as backward ends, which
no bucketing can hide (sd35m has 24 layers); narrow, so a step takes seconds on one CPU core.
Images are all 64×64 (one bucket: every step has the same shapes). One sample per rank per step, the
demo recipe otherwise (int8 base, gradient checkpointing, clip by value), adamw, no EMA, no checkpoints.

Modes, each measured on both ranks at once (one intra-op thread each, one core each):
- single: each rank trains alone (world size 1, the same per-rank batch): the step without any sync;
- blocking: one flat fp32 all-reduce after backward (the previous path);
- overlap-fp32, overlap-bf16: bucketed all-reduces launched from gradient hooks during backward.
Exposed communication = step − single step; hidden_fraction = 1 − exposed / standalone all-reduce.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WIDE = {
    "num_attention_heads": 8,
    "attention_head_dim": 64,
    "caption_projection_dim": 512,
    "num_layers": 8,
    "dual_attention_layers": (),
}
MODES = ("single", "blocking", "overlap-fp32", "overlap-bf16")


def prepare(root: Path) -> Path:
    """The widened tiny pipeline, 64×64 demo images and a config; returns the config path."""
    import torch
    from diffusers import SD3Transformer2DModel
    from PIL import Image

    from relay_train.demo.data import make_demo_dataset
    from relay_train.demo.recipe import write_recipe
    from relay_train.demo.tiny_model import make_pipeline, transformer_config

    model = make_pipeline(root / "wide-sd3")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        SD3Transformer2DModel(**{**transformer_config("tiny"), **WIDE}).save_pretrained(model / "transformer")
    data = make_demo_dataset(root / "data", count=32)
    for image in list(data.glob("*.png")):
        if Image.open(image).size != (64, 64):
            image.unlink()
            image.with_suffix(".txt").unlink()
    config = write_recipe(
        root,
        model,
        data,
        text_cache=root / "cache/text",
        lycoris=REPO / "configs/sd3/lycoris_config.json",
        train_batch_size=1,
        max_train_steps=100_000,
        checkpointing_steps=100_000,
        optimizer="adamw",
        use_ema=False,
        resume_from_checkpoint="none",
        caption_dropout_probability=0.0,
    )
    from relay_train.config import load_config
    from relay_train.data.plan import plan_dataset
    from relay_train.model import resolve_model_path
    from relay_train.data.encode import build_missing

    loaded = load_config(config)
    plan = plan_dataset(loaded, resolve_model_path(loaded.pretrained_model_name_or_path))
    if not plan.complete:  # encode once here: the ranks only read the caches
        build_missing(plan, resolve_model_path(loaded.pretrained_model_name_or_path), torch.device("cpu"), torch.float32)
    return config


class Rank:
    """One training process (a Ray actor pinned to one node): builds a trainer per mode, times steps."""

    def __init__(self, rank: int, master: str, port: int, config_path: str, bucket_mb: float):
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR=master, MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=2)
        self.rank, self.config_path, self.bucket_mb = rank, config_path, bucket_mb
        self.trainers: dict = {}
        self.timelines: list = []

    def node_ip(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def build(self, mode: str) -> int:
        import torch

        from relay_train.config import load_config
        from relay_train.parallel import GradientSync
        from relay_train.trainer import build_trainer

        sync = {
            "single": GradientSync(),
            "single-blocking": GradientSync(overlap=False),
            "blocking": GradientSync(overlap=False),
            "overlap-fp32": GradientSync(bucket_mb=self.bucket_mb),
            "overlap-bf16": GradientSync(bucket_mb=self.bucket_mb, dtype="bf16"),
        }[mode]
        world = 1 if mode.startswith("single") else 2
        trainer = build_trainer(
            load_config(self.config_path),
            device=torch.device("cpu"),
            rank=0 if world == 1 else self.rank,
            world_size=world,
            gradient_sync=sync,
        )
        self.trainers[mode] = trainer
        return sum(p.numel() for p in trainer.params)

    def steps(self, mode: str, count: int, trace: bool = False) -> list[tuple[float, float, float]]:
        """`count` optimizer steps: (step, backward, sync wait after backward) seconds each. With `trace`,
        a timeline of backward and the buckets. Instrumentation only: the same calls, bracketed by clock reads."""
        trainer = self.trainers[mode]
        update, reducer = trainer.update, getattr(trainer.update, "reducer", None)
        marks: list = []
        clock = {"backward": 0.0, "wait": 0.0}
        backward, finish = update.backward, reducer.finish if reducer is not None else None

        def timed_backward(loss):
            marks.append(("backward", -1, time.perf_counter()))
            backward(loss)
            marks.append(("backward_end", -1, time.perf_counter()))
            clock["backward"] += marks[-1][2] - marks[-2][2]

        def timed_finish():
            start = time.perf_counter()
            finish()
            clock["wait"] += time.perf_counter() - start

        update.backward = timed_backward
        if reducer is not None:
            reducer.finish = timed_finish
            if trace and hasattr(reducer, "timeline"):
                reducer.timeline = marks
        times = []
        for _ in range(count):
            clock.update(backward=0.0, wait=0.0)
            start = time.perf_counter()
            marks.append(("step", -1, start))
            trainer.optimizer_step()
            times.append((time.perf_counter() - start, clock["backward"], clock["wait"]))
            marks.append(("step_end", -1, time.perf_counter()))
        del update.backward  # back to the class's methods
        if reducer is not None:
            del reducer.finish
            if hasattr(reducer, "timeline"):
                reducer.timeline = None
        if trace:
            self.timelines.append(marks)
        return times

    def allreduce(self, numel: int, dtype: str, reps: int) -> list[float]:
        """The standalone all-reduce of the adapter's gradients: one flat buffer, nothing else running."""
        import torch
        import torch.distributed as dist

        flat = torch.ones(numel, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
        times = []
        for _ in range(reps):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(flat)
            times.append(time.perf_counter() - start)
        return times

    def timeline(self) -> list:
        return self.timelines


def driver(config_path: str, out: str, rounds: int, steps: int, bucket_mb: float) -> None:
    """Runs inside node a: one Rank per node, every mode in interleaved rounds, figures to `out`."""
    import ray

    ray.init(configure_logging=False, log_to_driver=False)
    RemoteRank = ray.remote(Rank)
    head = os.environ["RAY_ADDRESS"].split(":")[0]
    ranks = [
        RemoteRank.options(num_cpus=1, resources={node: 1}).remote(n, head, 29500, config_path, bucket_mb)
        for n, node in enumerate(("node_a", "node_b"))
    ]
    ips = ray.get([r.node_ip.remote() for r in ranks])
    numel = None
    for mode in ("single-blocking", *MODES):
        numel = ray.get([r.build.remote(mode) for r in ranks])[0]
    figures: dict[str, dict[str, list[float]]] = {
        m: {"step": [], "backward": [], "wait": []} for m in ("single-blocking", *MODES)
    }
    for mode in figures:  # warm-up; the overlapped modes record their bucket order here
        ray.get([r.steps.remote(mode, 2) for r in ranks])
    standalone = {"fp32": [], "bf16": []}
    for round_ in range(rounds):  # interleaved, so every mode sees the machine's load alike
        for mode in list(figures) if round_ % 2 == 0 else list(reversed(figures)):  # no mode always first
            times = ray.get([r.steps.remote(mode, steps, trace=round_ == rounds - 1 and mode == "overlap-fp32") for r in ranks])
            for a, b in zip(*times):
                figures[mode]["step"].append(max(a[0], b[0]))  # a step ends when its slower rank does
                figures[mode]["backward"].append((a[1] + b[1]) / 2)
                # the rank that ends backward last waits only for the network, the other also for it
                figures[mode]["wait"].append(min(a[2], b[2]))
        for dtype in standalone:
            times = ray.get([r.allreduce.remote(numel, dtype, 2) for r in ranks])
            standalone[dtype] += [max(a, b) for a, b in zip(*times)]
    timeline = ray.get(ranks[0].timeline.remote())
    Path(out).write_text(
        json.dumps({"ips": ips, "numel": numel, "figures": figures, "standalone": standalone, "timeline": timeline})
    )


def report(result: dict, rate_mbit: float, bucket_mb: float) -> None:
    fig = {mode: {k: statistics.median(v) for k, v in figures.items()} for mode, figures in result["figures"].items()}
    ar = {dtype: statistics.median(times) for dtype, times in result["standalone"].items()}
    mib = result["numel"] * 4 / (1 << 20)
    print(
        f"two Ray nodes {result['ips']} over a veth link shaped to {rate_mbit} Mbit/s each way; adapter "
        f"{result['numel'] / 1e6:.2f}M fp32 parameters ({mib:.1f} MiB), buckets of {bucket_mb} MiB; medians of "
        f"{len(result['figures']['single']['step'])} steps per mode"
    )
    print(
        f"{'mode':<14} {'step s':>7} {'backward s':>10} {'standalone all-reduce s':>23} {'exposed s':>9} "
        f"{'wait after backward s':>21}"
    )
    single = fig["single"]["step"]
    hidden, hidden_wait = {}, {}
    for mode in MODES:
        wire = "bf16" if mode.endswith("bf16") else "fp32"
        row = fig[mode]
        if mode == "single":
            print(f"{mode:<14} {row['step']:>7.3f} {row['backward']:>10.3f}")
            continue
        exposed = row["step"] - single
        hidden[mode], hidden_wait[mode] = 1 - exposed / ar[wire], 1 - row["wait"] / ar[wire]
        print(f"{mode:<14} {row['step']:>7.3f} {row['backward']:>10.3f} {ar[wire]:>23.3f} {exposed:>9.3f} {row['wait']:>21.3f}")
    print("hidden share of the all-reduce, 1 - exposed/standalone: " + ", ".join(f"{m} {h:.2f}" for m, h in hidden.items()))
    print(
        "the same from the wait after backward (immune to step-to-step compute noise, blind to a slower "
        "backward): " + ", ".join(f"{m} {h:.2f}" for m, h in hidden_wait.items())
    )
    print(
        f"1 worker, this build's default (overlap) vs blocking sync, both syncing nothing: speed ratio "
        f"{fig['single-blocking']['step'] / single:.3f} (goal >= 0.98)"
    )
    if result["timeline"]:
        marks = result["timeline"][-1]
        steps = [i for i, m in enumerate(marks) if m[0] == "step"]
        last = marks[steps[-1] :]
        t0 = last[0][2]
        print("timeline of the last traced overlap-fp32 step on rank 0 (ms from the step's start; done = its wait returned):")
        print("  " + "  ".join(f"{what}{'' if b < 0 else b}@{1000 * (t - t0):.0f}" for what, b, t in last))
    print(f"hidden_fraction={hidden['overlap-fp32']:.3f}")


# Measured on one H100 (bench/RESULTS.md, bench/gpu_step_h100.json): the production step and its backward.
H100_STEP_S, H100_BACKWARD_SHARE, ADAPTER_PARAMS = 1.782, 0.67, 198.8e6


def production_arithmetic(bucket_mb: float = 25.0) -> None:
    """Ring all-reduce: each node sends 2(N-1)/N of the gradient bytes. Blocking adds all of it to the
    step; overlapped hides what fits in backward and leaves the last bucket's all-reduce exposed."""
    backward = H100_STEP_S * H100_BACKWARD_SHARE
    print(
        f"production, per step: {H100_STEP_S} s on an H100, backward {backward:.3f} s, adapter "
        f"{ADAPTER_PARAMS / 1e6:.1f}M params ({ADAPTER_PARAMS * 4 / 2**30:.2f} GiB fp32), buckets {bucket_mb} MiB"
    )
    print(
        f"{'nodes':>5} {'Gb/s':>5} {'wire':>5} {'all-reduce s':>12} {'blocking step':>13} {'overlapped step':>15} "
        f"{'speed blocking':>14} {'speed overlapped':>16}"
    )
    for nodes in (4, 8):
        for gbps in (10, 25, 100):
            for wire, size in (("fp32", 4), ("bf16", 2)):
                share = 2 * (nodes - 1) / nodes
                allreduce = share * ADAPTER_PARAMS * size * 8 / (gbps * 1e9)
                last = share * bucket_mb * 2**20 * (size / 4) * 8 / (gbps * 1e9)
                blocking = H100_STEP_S + allreduce
                overlapped = H100_STEP_S + max(0.0, allreduce - backward) + last
                print(
                    f"{nodes:>5} {gbps:>5} {wire:>5} {allreduce:>12.3f} {blocking:>13.3f} {overlapped:>15.3f} "
                    f"{H100_STEP_S / blocking:>14.2f} {H100_STEP_S / overlapped:>16.2f}"
                )


def bench_overlap(rate_mbit: float, rounds: int, steps: int, bucket_mb: float) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from support.netns import RayOnTwoNodes, TwoNodes, unavailable

    reason = unavailable()
    if reason:
        print(f"overlap bench skipped: {reason}")
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still tears the namespaces down
    with tempfile.TemporaryDirectory(prefix="ovl") as tmp:
        root = Path(tmp)
        config = prepare(root)
        out = root / "figures.json"
        with (
            TwoNodes(rate_mbit=rate_mbit) as nodes,
            RayOnTwoNodes(nodes, cpus=(2, 1), resources=({"node_a": 1}, {"node_b": 1})) as cluster,
        ):
            done = cluster.run_driver(
                [sys.executable, __file__, "--driver", str(config), str(out), str(rounds), str(steps), str(bucket_mb)],
                timeout=3000,
            )
            if done.returncode != 0:
                raise RuntimeError(f"the bench driver failed:\n{done.stdout[-6000:]}")
        report(json.loads(out.read_text()), rate_mbit, bucket_mb)
    production_arithmetic()


if __name__ == "__main__" and sys.argv[1:2] == ["--driver"]:
    sys.path.insert(0, str(REPO))
    config_path, out, rounds, steps, bucket_mb = sys.argv[2:7]
    driver(config_path, out, int(rounds), int(steps), float(bucket_mb))
