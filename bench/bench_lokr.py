"""The LoKr forward paths side by side on this machine: which one `lokr_forward: auto` should pick here.

Two measurements, each path interleaved round by round so the machine's load falls on both alike:
- the tiny preset's training forward + backward (int8 base, the seed's LoKr config, batch 2 at 64²), the
  model `relay demo` and the tests train, through relay_train.model's own build;
- one LoKr module at sd35m's shapes (step_profile.SD35M_LOKR) with --tokens tokens, forward + backward.

    OMP_NUM_THREADS=1 python bench/bench_lokr.py               # CPU
    python bench/bench_lokr.py --device cuda --tokens 17308    # a GPU, the recipe's tokens per step
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from relay_train.config.files import LycorisConfig  # noqa: E402
from relay_train.lokr import LOKR_FORWARDS, lokr_modules, set_lokr_forward  # noqa: E402
from relay_train.model import attach_lokr, enable_gradient_checkpointing, load_transformer, quantize_base  # noqa: E402

PATHS = [p for p in LOKR_FORWARDS if p != "auto"]
SD35M_LOKR = {  # (w1, w2) shapes as LyCORIS factorises sd35m's linears with the seed's config
    "attention 1536->1536": ((2, 2), (768, 768)),
    "ff in 1536->6144": ((4, 4), (1536, 384)),
    "ff out 6144->1536": ((4, 4), (384, 1536)),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def tiny_step(rounds: int, device: torch.device) -> dict[str, float]:
    from relay_train.demo.tiny_model import make_pipeline

    lycoris = LycorisConfig(**json.loads((REPO / "configs/sd3/lycoris_config.json").read_text()))
    with tempfile.TemporaryDirectory() as scratch:
        transformer = load_transformer(make_pipeline(Path(scratch) / "tiny"), torch.float32)
    quantize_base(transformer, "int8-quanto")
    transformer.requires_grad_(False).to(device)
    enable_gradient_checkpointing(transformer)
    network = attach_lokr(transformer, lycoris).to(device).requires_grad_(True)
    with torch.no_grad():
        for m in lokr_modules(network):
            m.lokr_w2.normal_(0, 0.05)  # LyCORIS starts w2 at zero; a trained adapter has none
    transformer.train()
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(2, 16, 8, 8, generator=g).to(device),
        encoder_hidden_states=torch.randn(2, 231, 64, generator=g).to(device),
        pooled_projections=torch.randn(2, 64, generator=g).to(device),
        timestep=torch.tensor([700.0, 300.0], device=device),
        return_dict=False,
    )
    times: dict[str, list[float]] = {p: [] for p in PATHS}
    for _ in range(rounds):
        for path in PATHS:
            set_lokr_forward(network, path)
            sync(device)
            start = time.perf_counter()
            for _ in range(3):
                transformer(**inputs)[0].square().mean().backward()
            sync(device)
            times[path].append((time.perf_counter() - start) / 3)
    return {p: statistics.median(t[1:] or t) for p, t in times.items()}


def module_shapes(tokens: int, rounds: int, device: torch.device, dtype: torch.dtype) -> dict[str, dict[str, float]]:
    from lycoris.modules.lokr import LokrModule

    out: dict[str, dict[str, float]] = {}
    g = torch.Generator().manual_seed(0)
    for label, ((up, uq), (vp, vq)) in SD35M_LOKR.items():
        base = torch.nn.Linear(uq * vq, up * vp, bias=False).to(device, dtype).requires_grad_(False)
        lokr = LokrModule("bench", base, lora_dim=10000, factor=up, full_matrix=True, bypass_mode=True).to(device)
        with torch.no_grad():
            lokr.lokr_w2.normal_(0, 0.02, generator=None)
        lokr.apply_to()
        x = torch.randn(tokens, uq * vq, generator=g).to(device, dtype)
        times: dict[str, list[float]] = {p: [] for p in PATHS}
        for _ in range(rounds):
            for path in PATHS:
                set_lokr_forward(torch.nn.ModuleList([lokr]), path)
                sync(device)
                start = time.perf_counter()
                base(x).float().square().mean().backward()
                sync(device)
                times[path].append(time.perf_counter() - start)
        out[label] = {p: statistics.median(t[1:] or t) * 1e3 for p, t in times.items()}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=1024, help="tokens per call at sd35m's shapes")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results = {
        "tiny_step_s": tiny_step(args.rounds, device),
        "sd35m_module_ms": module_shapes(args.tokens, args.rounds, device, dtype),
    }
    tiny = results["tiny_step_s"]
    print(f"tiny preset fwd+bwd, batch 2 at 64², {device.type}, median of {args.rounds} rounds:")
    print("| path | s/step | vs bypass |\n|---|---|---|")
    for path in PATHS:
        print(f"| {path} | {tiny[path]:.4f} | {tiny['bypass'] / tiny[path]:.2f}x |")
    print(f"\none LoKr module at sd35m's shapes, {args.tokens} tokens, {dtype}, fwd+bwd (ms):")
    print("| layer | bypass | materialized | speed-up |\n|---|---|---|---|")
    for label, r in results["sd35m_module_ms"].items():
        print(f"| {label} | {r['bypass']:.2f} | {r['materialized']:.2f} | {r['bypass'] / r['materialized']:.2f}x |")
    return results


if __name__ == "__main__":
    main()
