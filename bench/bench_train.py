"""Steps/s and peak RSS: `relay train` on the demo config against a bare loop, side by side.

The bare loop has the same tiny model, int8 quantization, LoKr adapter, optimizer and batch shapes
(the demo's four aspect buckets, batches of 2), but no config parsing, data pipeline, checkpoints,
EMA, hooks or progress display. Each run is its
own process (so peak RSS is its own); runs alternate to share the machine's noise.

    python bench/bench_train.py [--steps 300] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from relay_train.logs import configure_logging

REPO = Path(__file__).resolve().parents[1]
MODEL, DATA = REPO / "demo/tiny-sd3", REPO / "demo/data"


def ensure_demo() -> None:
    """The demo's tiny model and images in demo/, made with the user's commands where missing."""
    if not (MODEL / "model_index.json").is_file() or not any(DATA.glob("*.txt")):
        subprocess.run([sys.executable, "-m", "relay_train.cli", "make-tiny-model", str(MODEL)], check=True, cwd=REPO)
        subprocess.run([sys.executable, "-m", "relay_train.cli", "make-demo-data", str(DATA)], check=True, cwd=REPO)


def relay_run(steps: int, out: Path) -> float:
    """The CLI's path: config → data → model → Trainer.fit with checkpoints and progress."""
    from relay_train.config import load_config
    from relay_train.progress import ProgressDisplay
    from relay_train.trainer import Hooks, build_trainer

    config = load_config(
        REPO / "configs/demo/config.json",
        {"max_train_steps": steps, "output_dir": str(out), "resume_from_checkpoint": "none", "disable_bucket_pruning": False},
    )  # full batches only, as in the bare loop
    hooks = Hooks()
    trainer = build_trainer(config, hooks=hooks)
    with ProgressDisplay(trainer.total_steps) as progress:
        hooks.on_step = progress
        start = time.perf_counter()
        trainer.fit()
    return steps / (time.perf_counter() - start)


def bare_run(steps: int, out: Path) -> float:
    """Same model, quantization, adapter and batch; nothing else."""
    import bitsandbytes as bnb
    import torch
    from diffusers import SD3Transformer2DModel
    from lycoris import LycorisNetwork, create_lycoris
    from optimum.quanto import freeze, qint8, quantize

    lyco = json.loads((REPO / "configs/demo/lycoris_config.json").read_text())
    transformer = SD3Transformer2DModel.from_pretrained(MODEL, subfolder="transformer")
    quantize(transformer, weights=qint8, exclude=["*norm*", "proj_out", "pos_embed*", "context_embedder", "time_text_embed*"])
    freeze(transformer)
    transformer.requires_grad_(False)
    transformer.enable_gradient_checkpointing()
    LycorisNetwork.apply_preset(lyco["apply_preset"])
    network = create_lycoris(
        transformer,
        lyco["multiplier"],
        linear_dim=lyco["linear_dim"],
        linear_alpha=lyco["linear_alpha"],
        algo="lokr",
        factor=lyco["factor"],
        full_matrix=True,
        bypass_mode=True,
    )
    network.apply_to()
    params = list(network.parameters())
    opt = bnb.optim.AdamW8bit(params, lr=1e-3, weight_decay=1e-2)
    g = torch.Generator().manual_seed(0)
    # the demo's four aspect buckets (48x80, 80x48, 64x64, 96x48 px) as latent shapes, in turn
    shapes = [(10, 6), (6, 10), (8, 8), (6, 12)]
    embeds, pooled = torch.randn(2, 231, 64), torch.randn(2, 64)
    start = time.perf_counter()
    for step in range(steps):
        latents = torch.randn(2, 16, *shapes[step % 4], generator=g)
        noise = torch.randn(latents.shape, generator=g)
        sigma = torch.sigmoid(torch.randn(2, generator=g))
        sigma = 3 * sigma / (1 + 2 * sigma)
        noisy = (1 - sigma.view(-1, 1, 1, 1)) * latents + sigma.view(-1, 1, 1, 1) * noise
        pred = transformer(
            hidden_states=noisy, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=sigma * 1000, return_dict=False
        )[0]
        loss = torch.mean((pred.float() - (noise - latents)) ** 2)
        loss.backward()
        torch.nn.utils.clip_grad_value_(params, 0.1)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps / (time.perf_counter() - start)


def child(mode: str, steps: int) -> None:
    configure_logging()
    logging.getLogger().setLevel(logging.WARNING)  # the bench's figures only: warnings and errors
    with tempfile.TemporaryDirectory() as tmp:
        rate = (relay_run if mode == "relay" else bare_run)(steps, Path(tmp))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"mode": mode, "steps_per_s": rate, "peak_rss_mib": peak_mib}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", choices=["relay", "bare"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.steps)
    ensure_demo()
    results: dict[str, list[dict]] = {"relay": [], "bare": []}
    for _ in range(args.rounds):
        for mode in results:
            out = subprocess.run(
                [sys.executable, __file__, "--child", mode, "--steps", str(args.steps)],
                cwd=REPO,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            results[mode].append(json.loads(out.strip().splitlines()[-1]))
    med = {m: (statistics.median(r["steps_per_s"] for r in rs), max(r["peak_rss_mib"] for r in rs)) for m, rs in results.items()}
    print(f"{'run':<8}{'steps/s (median)':>18}{'peak RSS MiB':>14}   per-round steps/s")
    for mode, (rate, rss) in med.items():
        rounds = ", ".join(f"{r['steps_per_s']:.1f}" for r in results[mode])
        print(f"{mode:<8}{rate:>18.2f}{rss:>14.0f}   {rounds}")
    print(f"ratio relay/bare: steps/s {med['relay'][0] / med['bare'][0]:.3f}, peak RSS {med['relay'][1] / med['bare'][1]:.3f}")


if __name__ == "__main__":
    main()
