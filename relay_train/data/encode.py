"""Encode what the caches lack: VAE latents per image, text embeddings per caption.

`LatentEncoder` and `TextEncoder` are callables over a batch of work items (a dict of columns),
the shape Ray Data's `map_batches` hands to an actor class. The trainer (when caches are
incomplete), `relay precompute` and `jobs/precompute.py` all run these same two classes, so a cache
entry is the same bytes whoever wrote it. Each encoder writes its entries as soon as a batch is
done, and work items are only what is missing, so a killed precompute resumes where it stopped.

`encode_dataset` is the trainer's seam: plan (relay_train.data.plan), encode what is missing, open
the dataset (relay_train.data.dataset), which then reads the caches alone. When the caches are
complete it never loads a text encoder or the VAE.
"""

from __future__ import annotations

import gc
import logging
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

from relay_train.config import DataBackendConfig, TrainConfig
from relay_train.data.buckets import Bucket
from relay_train.data.caches import T5_TOKENS, TensorCache
from relay_train.data.decode import decode_image
from relay_train.data.dataset import BuildStats, EncodedDataset, open_dataset
from relay_train.data.plan import DatasetPlan, drop_samples, plan_dataset, text_cache_store, vae_cache_store
from relay_train.data.store import FileStore, image_store
from relay_train.flow import normalize_latents

log = logging.getLogger(__name__)

Batch = dict[str, Sequence[Any]]


def latent_items(plan: DatasetPlan) -> list[dict[str, Any]]:
    """One row per missing latent, grouped by bucket so a VAE batch is (mostly) one image size."""
    rows = []
    for key in plan.missing_latents:
        backend, record, (width, height) = plan.records[key]
        rows.append(
            {
                "latent_key": key,
                "backend": backend,
                "image_key": record.key,
                "digest": record.digest,
                "width": width,
                "height": height,
            }
        )
    return sorted(rows, key=lambda r: (r["width"], r["height"], r["latent_key"]))


def text_items(plan: DatasetPlan) -> list[dict[str, Any]]:
    return [{"text_key": key, "caption": plan.captions[key]} for key in plan.missing_text]


def load_pixels(data: bytes, bucket: Bucket, backend: DataBackendConfig, seed: int = 0) -> torch.Tensor:
    """Resize to cover the bucket, crop to it; (3, H, W) in [-1, 1].

    crop_style picks the window: centre, top-left corner, or a random one drawn from `seed`
    (the image's hash), so the cached latent stays a pure function of the cache key.
    """
    width, height = bucket
    with decode_image(data) as im:  # upright, 8-bit, transparency on white: as discovery sized it
        scale = max(width / im.width, height / im.height)
        im = im.resize((max(width, round(im.width * scale)), max(height, round(im.height * scale))), Image.BICUBIC)
        spare_x, spare_y = im.width - width, im.height - height
        style = backend.crop_style if backend.crop else "center"
        if style == "corner":
            left, top = 0, 0
        elif style == "random":
            rng = np.random.default_rng(seed)
            left, top = int(rng.integers(0, spare_x + 1)), int(rng.integers(0, spare_y + 1))
        else:
            left, top = spare_x // 2, spare_y // 2
        im = im.crop((left, top, left + width, top + height))
        array = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


class LatentEncoder:
    """Loads the VAE once; per batch: read images, resize/crop into their bucket, encode, cache."""

    def __init__(self, config: TrainConfig, model_path: str | Path, device: str = "cpu", dtype: str = "float32") -> None:
        from diffusers import AutoencoderKL

        self.config, self.device, self.dtype = config, torch.device(device), getattr(torch, dtype)
        self.vae = (
            AutoencoderKL.from_pretrained(Path(model_path), subfolder="vae", dtype=self.dtype, local_files_only=True)
            .to(self.device)
            .eval()
        )
        self.backends = [b for b in config.data_backends if b.dataset_type == "image" and not b.disabled]
        self._stores: dict[int, tuple[FileStore, TensorCache]] = {}

    def _store(self, index: int) -> tuple[FileStore, TensorCache]:
        if index not in self._stores:  # built lazily, in the actor's process
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
        self.pipe = StableDiffusion3Pipeline.from_pretrained(
            Path(model_path), transformer=None, vae=None, dtype=self.dtype, local_files_only=True
        ).to(self.device)
        self.cache = TensorCache(text_cache_store(config), config.compress_disk_cache)

    @torch.no_grad()
    def __call__(self, batch: Batch) -> dict[str, np.ndarray]:
        keys, captions = list(batch["text_key"]), [str(c) for c in batch["caption"]]
        # CLIP-L/G at 77 tokens + T5 at 154, concatenated to (231, 4096); pooled = cat(L, G).
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=captions,
            prompt_2=captions,
            prompt_3=captions,
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=T5_TOKENS,
        )
        for key, e, p in zip(keys, embeds, pooled):
            self.cache.put(key, {"prompt_embeds": e.to(self.dtype).cpu(), "pooled_embeds": p.to(self.dtype).cpu()})
        return {"key": np.array(keys, dtype=object), "ok": np.ones(len(keys), dtype=bool)}


def _seed(key: str) -> int:
    return int(key[:15], 16)


def _columns(rows: list[dict[str, Any]]) -> Batch:
    return {name: [row[name] for row in rows] for name in rows[0]}


Progress = Callable[[str, int, int], None]


def run_in_process(
    encoder: Callable[[Batch], dict[str, np.ndarray]],
    rows: list[dict[str, Any]],
    batch_size: int,
    what: str,
    progress: Progress | None = None,
) -> list[str]:
    """Feed rows to an encoder batch by batch; returns the keys that failed."""
    failed: list[str] = []
    for start in range(0, len(rows), batch_size):
        out = encoder(_columns(rows[start : start + batch_size]))
        failed += [k for k, ok in zip(out["key"], out["ok"]) if not ok]
        if progress:
            progress(what, min(start + batch_size, len(rows)), len(rows))
    return failed


def build_missing(
    plan: DatasetPlan, model_path: Path, device: torch.device, dtype: torch.dtype, progress: Progress | None = None
) -> BuildStats:
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


# ---------------------------------------------------------------- the trainer's seam


def encode_dataset(
    config: TrainConfig, model_path: Path, device: torch.device, dtype: torch.dtype, rank: int = 0, world_size: int = 1
) -> EncodedDataset:
    """Plan the dataset, encode whatever the caches lack (loading only the encoders needed), then
    open it for reading from the caches alone.

    On several ranks (a torch.distributed group of `world_size`) rank 0 alone plans and encodes:
    discovery writes the shared index.json and problematic_images.json (and may delete bad files),
    and every rank encoding would load the encoders N times to write the same entries. The others
    receive its plan, and with it the news that the caches are complete. For a big dataset run
    jobs/precompute.py first: they wait for rank 0 at most torch.distributed's timeout."""

    def plan_and_encode() -> tuple[DatasetPlan, BuildStats]:
        plan = plan_dataset(config, model_path)
        return plan, (BuildStats() if plan.complete else build_missing(plan, model_path, device, dtype))

    plan, stats = plan_and_encode() if world_size == 1 else from_rank_zero(plan_and_encode, rank, device)
    return open_dataset(plan, stats)


T = TypeVar("T")


def from_rank_zero(make: Callable[[], T], rank: int, device: torch.device) -> T:
    """`make()` run on rank 0 alone; every other rank gets its result (or its error) pickled, in one
    broadcast that also holds them until rank 0 is done."""
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("several ranks need a torch.distributed process group: rank 0 plans the data for all")
    payload: list[Any] = [None]
    # NCCL broadcasts a device tensor; gloo a CPU one
    on = device if dist.get_backend() == "nccl" else None
    if rank == 0:
        try:
            payload[0] = make()
        except Exception as exc:
            dist.broadcast_object_list([_portable(exc)], src=0, device=on)  # the others fail now, not at the timeout
            raise
    dist.broadcast_object_list(payload, src=0, device=on)
    if isinstance(payload[0], Exception):
        raise payload[0]
    return payload[0]


def _portable(exc: Exception) -> Exception:
    """The error itself when it survives pickling, else its text."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001 - an exception class whose constructor pickle cannot replay
        return RuntimeError(f"rank 0: {type(exc).__name__}: {exc}")
    return exc
