"""Encode what the caches lack: VAE latents per image, text embeddings per caption.

`LatentEncoder` and `TextEncoder` are callables over a batch of work items (a dict of columns),
the shape Ray Data's `map_batches` hands to an actor class. The trainer (when caches are
incomplete), `relay precompute` and `jobs/precompute.py` all run these same two classes, so a cache
entry is the same bytes whoever wrote it. Each encoder writes its entries as soon as a batch is
done, and work items are only what is missing, so a killed precompute resumes where it stopped.
"""

from __future__ import annotations

import argparse
import gc
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from relay_train.data.caches import T5_TOKENS, TensorCache
from relay_train.config import TrainConfig
from relay_train.data.dataset import (
    BuildStats, DatasetPlan, drop_samples, load_pixels, plan_dataset, text_cache_store, vae_cache_store,
)
from relay_train.flow import normalize_latents
from relay_train.data.store import FileStore, image_store

log = logging.getLogger(__name__)

Batch = dict[str, Sequence[Any]]


def latent_items(plan: DatasetPlan) -> list[dict[str, Any]]:
    """One row per missing latent, grouped by bucket so a VAE batch is (mostly) one image size."""
    rows = []
    for key in plan.missing_latents:
        backend, record, (width, height) = plan.records[key]
        rows.append({"latent_key": key, "backend": backend, "image_key": record.key, "digest": record.digest,
                     "width": width, "height": height})
    return sorted(rows, key=lambda r: (r["width"], r["height"], r["latent_key"]))


def text_items(plan: DatasetPlan) -> list[dict[str, Any]]:
    return [{"text_key": key, "caption": plan.captions[key]} for key in plan.missing_text]


class LatentEncoder:
    """Loads the VAE once; per batch: read images, resize/crop into their bucket, encode, cache."""

    def __init__(self, config: TrainConfig, model_path: str | Path, device: str = "cpu", dtype: str = "float32") -> None:
        from diffusers import AutoencoderKL

        self.config, self.device, self.dtype = config, torch.device(device), getattr(torch, dtype)
        self.vae = AutoencoderKL.from_pretrained(Path(model_path), subfolder="vae", dtype=self.dtype,
                                                 local_files_only=True).to(self.device).eval()
        self.backends = [b for b in config.data_backends if b.dataset_type == "image" and not b.disabled]
        self._stores: dict[int, tuple[FileStore, TensorCache]] = {}

    def _store(self, index: int) -> tuple[FileStore, TensorCache]:
        if index not in self._stores:  # built lazily, in the actor's process: boto3 clients do not pickle
            backend = self.backends[index]
            cache = TensorCache(vae_cache_store(self.config, backend), self.config.compress_disk_cache)
            self._stores[index] = (image_store(backend), cache)
        return self._stores[index]

    @torch.no_grad()
    def __call__(self, batch: Batch) -> dict[str, np.ndarray]:
        keys, ok = list(batch["latent_key"]), []
        groups: dict[tuple[int, int], list[int]] = {}
        for i in range(len(keys)):
            groups.setdefault((int(batch["width"][i]), int(batch["height"][i])), []).append(i)
        for bucket, members in groups.items():
            pixels, good = [], []
            for i in members:
                store, _ = self._store(int(batch["backend"][i]))
                try:
                    data = store.read(str(batch["image_key"][i]))
                    pixels.append(load_pixels(data, bucket, self.backends[int(batch["backend"][i])], _seed(keys[i])))
                    good.append(i)
                except Exception as exc:  # vanished or changed since discovery (any decoder error): skip, never crash
                    log.warning("latent for %s not encoded: %s", batch["image_key"][i], exc)
            if good:
                self._encode(torch.stack(pixels), [keys[i] for i in good], [int(batch["backend"][i]) for i in good])
            ok += good
        done = set(ok)
        return {"key": np.array(keys, dtype=object), "ok": np.array([i in done for i in range(len(keys))])}

    def _encode(self, pixels: torch.Tensor, keys: list[str], backends: list[int]) -> None:
        dist = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        for j, key in enumerate(keys):
            # One posterior draw per image, seeded by its cache key: the entry is a pure function of
            # the key, whatever batch or machine encoded it.
            noise = torch.randn(dist.mean[j].shape, generator=torch.Generator().manual_seed(_seed(key)))
            sample = dist.mean[j] + dist.std[j] * noise.to(self.device, self.dtype)
            latents = normalize_latents(sample.float(), self.vae.config.shift_factor, self.vae.config.scaling_factor)
            self._store(backends[j])[1].put(key, {"latents": latents.to(self.dtype).cpu()})


class TextEncoder:
    """Loads the three text encoders once (no VAE, no transformer); per batch: encode, cache."""

    def __init__(self, config: TrainConfig, model_path: str | Path, device: str = "cpu", dtype: str = "float32") -> None:
        from diffusers import StableDiffusion3Pipeline

        self.device, self.dtype = torch.device(device), getattr(torch, dtype)
        self.pipe = StableDiffusion3Pipeline.from_pretrained(Path(model_path), transformer=None, vae=None,
                                                             dtype=self.dtype, local_files_only=True).to(self.device)
        self.cache = TensorCache(text_cache_store(config), config.compress_disk_cache)

    @torch.no_grad()
    def __call__(self, batch: Batch) -> dict[str, np.ndarray]:
        keys, captions = list(batch["text_key"]), [str(c) for c in batch["caption"]]
        # CLIP-L/G at 77 tokens + T5 at 154, concatenated to (231, 4096); pooled = cat(L, G).
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompt=captions, prompt_2=captions, prompt_3=captions,
                                                      device=self.device, do_classifier_free_guidance=False,
                                                      max_sequence_length=T5_TOKENS)
        for key, e, p in zip(keys, embeds, pooled):
            self.cache.put(key, {"prompt_embeds": e.to(self.dtype).cpu(), "pooled_embeds": p.to(self.dtype).cpu()})
        return {"key": np.array(keys, dtype=object), "ok": np.ones(len(keys), dtype=bool)}


def _seed(key: str) -> int:
    return int(key[:15], 16)


def _columns(rows: list[dict[str, Any]]) -> Batch:
    return {name: [row[name] for row in rows] for name in rows[0]}


Progress = Callable[[str, int, int], None]


def run_in_process(encoder: Callable[[Batch], dict[str, np.ndarray]], rows: list[dict[str, Any]], batch_size: int,
                   what: str, progress: Progress | None = None) -> list[str]:
    """Feed rows to an encoder batch by batch; returns the keys that failed."""
    failed: list[str] = []
    for start in range(0, len(rows), batch_size):
        out = encoder(_columns(rows[start : start + batch_size]))
        failed += [k for k, ok in zip(out["key"], out["ok"]) if not ok]
        if progress:
            progress(what, min(start + batch_size, len(rows)), len(rows))
    return failed


def build_missing(plan: DatasetPlan, model_path: Path, device: torch.device, dtype: torch.dtype,
                  progress: Progress | None = None) -> BuildStats:
    """Encode the plan's missing entries in this process, one encoder at a time (each freed after)."""
    stats, dtype_name = BuildStats(), str(dtype).removeprefix("torch.")
    progress = progress or LogProgress()
    if plan.missing_latents:
        encoder = LatentEncoder(plan.config, model_path, str(device), dtype_name)
        failed = run_in_process(encoder, latent_items(plan), plan.config.vae_batch_size, "latents", progress)
        stats.latents, stats.failed = len(plan.missing_latents) - len(failed), len(failed)
        drop_samples(plan, set(failed))
        del encoder
    if plan.missing_text:
        encoder = TextEncoder(plan.config, model_path, str(device), dtype_name)
        run_in_process(encoder, text_items(plan), 16, "text embeddings", progress)
        stats.text = len(plan.missing_text)
        del encoder
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    plan.missing_latents, plan.missing_text = [], []
    return stats


class LogProgress:
    """About ten log lines per pass whatever its size: the progress display when not at a terminal."""

    def __init__(self) -> None:
        self.last: dict[str, int] = {}

    def __call__(self, what: str, done: int, total: int) -> None:
        if done == total or done - self.last.get(what, 0) >= max(1, total // 10):
            self.last[what] = done
            log.info("precompute %s: %d/%d", what, done, total)


def cmd_precompute(args: argparse.Namespace) -> int:
    """`relay precompute --config C [--set k=v ...]`: build the caches in this process (one GPU or the CPU)."""
    from relay_train.cli import parse_overrides
    from relay_train.config import load_config
    from relay_train.model import compute_dtype, pick_device, resolve_model_path

    config = load_config(args.config, parse_overrides(getattr(args, "set", None) or []))
    model_path = resolve_model_path(config.pretrained_model_name_or_path)
    device = pick_device()
    start = time.perf_counter()
    plan = plan_dataset(config, model_path)
    stats = build_missing(plan, model_path, device, compute_dtype(config, device))
    log.info("precompute done in %.1fs: %d latent(s), %d text embedding(s) encoded, %d failed, %d bad file(s) skipped",
             time.perf_counter() - start, stats.latents, stats.text, stats.failed, plan.problems)
    return 0
