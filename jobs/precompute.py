"""Build the VAE-latent and text-embedding caches with Ray Data, before (or beside) training.

    ray job submit --working-dir . -- python jobs/precompute.py --config configs/sd3/config.json [--gpus 1]

Only the missing entries are encoded, and each actor writes its batch's entries as soon as they
are done, so running this again after a kill picks up where it stopped; a run over complete caches
encodes nothing. On a cluster each actor holds one GPU; without --gpus it runs on the CPU.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray

from relay_train.config.overrides import add_set_flag, parse_overrides
from relay_train.config import TrainConfig, load_config
from relay_train.data.plan import plan_dataset
from relay_train.model import resolve_model_path
from relay_train.data.encode import LatentEncoder, LogProgress, TextEncoder, latent_items, text_items
from relay_train.failures import known_failure
from relay_train.logs import configure_logging

log = logging.getLogger("relay.precompute")


def encode(
    rows: list[dict[str, Any]],
    encoder: type,
    config: TrainConfig,
    model_path: Path,
    batch_size: int,
    what: str,
    gpus: float,
    actors: int,
) -> int:
    """map_batches over an actor pool (each loads its encoder once); returns entries written."""
    if not rows:
        log.info("precompute %s: cache complete, nothing to encode", what)
        return 0
    # The GPU path runs the encoders in bf16, as training would; the CPU path in fp32.
    device, dtype = ("cuda", "bfloat16") if gpus else ("cpu", "float32")
    dataset = ray.data.from_items(rows).map_batches(
        encoder,
        batch_size=batch_size,
        batch_format="numpy",
        num_gpus=gpus or None,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
        fn_constructor_kwargs={"config": config, "model_path": str(model_path), "device": device, "dtype": dtype},
    )
    progress, done, written = LogProgress(), 0, 0
    for out in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        done, written = done + len(out["key"]), written + int(out["ok"].sum())
        progress(what, done, len(rows))
    return written


def run(config: TrainConfig, gpus: float = 0, actors: int = 1) -> dict[str, int]:
    """Plan, then encode the missing latents, then the missing text embeddings."""
    model_path = resolve_model_path(config.pretrained_model_name_or_path)
    plan = plan_dataset(config, model_path)
    latents = encode(latent_items(plan), LatentEncoder, config, model_path, config.vae_batch_size, "latents", gpus, actors)
    text = encode(text_items(plan), TextEncoder, config, model_path, 16, "text embeddings", gpus, actors)
    return {"latents": latents, "text": text, "failed": len(plan.missing_latents) - latents, "bad_files": plan.problems}


def main(argv: Sequence[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="SimpleTuner config.json")
    add_set_flag(parser)
    parser.add_argument("--gpus", type=float, default=0, help="GPUs per encoder actor (0: CPU)")
    parser.add_argument("--actors", type=int, default=1, help="most encoder actors at once")
    args = parser.parse_args(argv)
    config = load_config(args.config, parse_overrides(args.set))
    if not ray.is_initialized():
        ray.init()  # inside `ray job submit` this joins the cluster; alone it starts a local one
    start = time.perf_counter()
    counts = run(config, args.gpus, args.actors)
    log.info("precompute done in %.1fs: %s", time.perf_counter() - start, counts)
    return counts


if __name__ == "__main__":
    configure_logging()
    try:
        main()
    except Exception as exc:
        known = known_failure(exc)  # the one map from a failure to its exit code (relay_train/failures.py)
        if known is None:
            raise
        log.error("%s", known.message)
        sys.exit(known.code)
