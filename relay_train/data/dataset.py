"""The dataset the trainer sees: aspect-bucketed samples read from the latent and text-embed caches.

    plan_dataset   discover every image backend (local or S3), bucket each image, key its cache
                   entries, and list what the caches already hold
    build_missing  (relay_train.data.encode) encode what is missing: the same code Ray Data runs
    open_dataset   an EncodedDataset that reads cache entries only

`encode_dataset` is the trainer's seam and does all three. When the caches are complete it never
loads a text encoder or the VAE.
"""

from __future__ import annotations

import io
import json
import logging
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from relay_train.data.buckets import Bucket, bucket_for
from relay_train.data.caches import (
    CORRUPT_REPORT,
    TensorCache,
    component_fingerprint,
    latent_key,
    text_key,
)
from relay_train.config import DataBackendConfig, TrainConfig
from relay_train.data.discovery import ImageRecord, discover, report_problems
from relay_train.data.store import FileStore, cache_store, image_store

log = logging.getLogger(__name__)

VAE_PARTS, TEXT_PARTS = ("vae",), ("text_encoder", "text_encoder_2", "text_encoder_3")
MEMORY_BUDGET = 1 << 30  # keep decoded entries in RAM when the whole cache is under this


@dataclass
class BucketTensors:
    latents: torch.Tensor  # (N, 16, H/8, W/8), normalised: (z − shift)·scale
    prompt_embeds: torch.Tensor  # (N, 231, joint_attention_dim)
    pooled_embeds: torch.Tensor  # (N, pooled_projection_dim)


@dataclass(frozen=True)
class SampleRef:
    backend: int  # index into DatasetPlan.backends / latent_caches
    latent: str  # latent cache key
    text: str  # text cache key


@dataclass
class BuildStats:
    latents: int = 0  # entries encoded by this call (0 when the caches were complete)
    text: int = 0
    failed: int = 0


@dataclass
class DatasetPlan:
    config: TrainConfig
    backends: list[DataBackendConfig]
    latent_caches: list[TensorCache]
    text_cache: TensorCache
    buckets: dict[Bucket, list[SampleRef]]
    records: dict[str, tuple[int, ImageRecord, Bucket]]  # latent key → where its image is
    captions: dict[str, str]  # text key → caption (the empty prompt included)
    empty_key: str
    missing_latents: list[str] = field(default_factory=list)
    missing_text: list[str] = field(default_factory=list)
    problems: int = 0

    @property
    def complete(self) -> bool:
        return not self.missing_latents and not self.missing_text


class EncodedDataset:
    """Samples by bucket; `batch` reads their cache entries (in parallel, for S3).

    A cache entry that does not decode (truncated, corrupted) never ends the run: it is reported with
    its name, removed from the cache so that the next start encodes it again, and every sample that
    uses it is replaced, for the rest of this run, by the next usable sample of its bucket (so batch
    shapes, and the data order of every other sample, are unchanged on every rank)."""

    def __init__(self, buckets: dict[Bucket, list[SampleRef]], latent_caches: list[TensorCache], text_cache: TensorCache,
                 empty_key: str, memory_budget: int = MEMORY_BUDGET, stats: BuildStats | None = None) -> None:
        self.buckets, self.latent_caches, self.text_cache = buckets, latent_caches, text_cache
        self.stats = stats or BuildStats()
        total = sum(self.latent_caches[r.backend].size_of(r.latent) + text_cache.size_of(r.text)
                    for refs in buckets.values() for r in refs)
        self._memo: dict[tuple[int, str], dict[str, torch.Tensor]] | None = {} if total <= memory_budget else None
        self._pool = ThreadPoolExecutor(max_workers=8)
        self.bad: set[tuple[int, str]] = set()  # (backend, key) of entries found corrupt; -1 is the text cache
        try:
            empty = self._read(-1, empty_key)
        except CorruptEntryError as exc:
            self._report(exc)
            raise ValueError(f"{exc}; it was removed: run again to encode it anew") from exc
        self.empty_prompt_embeds, self.empty_pooled_embeds = empty["prompt_embeds"], empty["pooled_embeds"]

    def bucket_sizes(self) -> dict[Bucket, int]:
        return {b: len(refs) for b, refs in self.buckets.items()}

    def batch(self, bucket: Bucket, indices: list[int]) -> BucketTensors:
        while True:  # ends: each pass either reads every entry or marks at least one more entry bad
            refs = [self._usable(bucket, i) for i in indices]
            wanted = [(r.backend, r.latent) for r in refs] + [(-1, r.text) for r in refs]
            if self._memo is not None and all(k in self._memo for k in wanted):
                entries = [self._memo[k] for k in wanted]
                break
            # each read is a GET on S3: overlap them
            results = list(self._pool.map(self._try_read, wanted))
            failed = [r for r in results if isinstance(r, CorruptEntryError)]
            if not failed:
                entries = results
                break
            for exc in failed:
                if (exc.backend, exc.key) not in self.bad:
                    self.bad.add((exc.backend, exc.key))
                    self._report(exc)
        latents, texts = entries[: len(refs)], entries[len(refs):]
        return BucketTensors(torch.stack([e["latents"] for e in latents]),
                             torch.stack([e["prompt_embeds"] for e in texts]),
                             torch.stack([e["pooled_embeds"] for e in texts]))

    def _usable(self, bucket: Bucket, index: int) -> SampleRef:
        """The sample, or (when one of its entries is corrupt) the next usable one of its bucket."""
        refs = self.buckets[bucket]
        for step in range(len(refs)):
            ref = refs[(index + step) % len(refs)]
            if (ref.backend, ref.latent) not in self.bad and (-1, ref.text) not in self.bad:
                return ref
        raise UnusableBatchError(f"every sample of aspect bucket {bucket[0]}x{bucket[1]} has a corrupt cache entry")

    def _try_read(self, item: tuple[int, str]) -> dict[str, torch.Tensor] | CorruptEntryError:
        try:
            return self._read(*item)
        except CorruptEntryError as exc:
            return exc

    def _read(self, backend: int, key: str) -> dict[str, torch.Tensor]:
        if self._memo is not None and (backend, key) in self._memo:
            return self._memo[(backend, key)]
        cache = self.text_cache if backend < 0 else self.latent_caches[backend]
        try:
            # Stored in the encoder's dtype (bf16 on a GPU); the step gets fp32 and autocasts itself.
            entry = {k: v.float() for k, v in cache.get(key).items()}
        except Exception as exc:  # truncated gzip, a bad safetensors header, a vanished file...
            raise CorruptEntryError(backend, key, cache.describe_entry(key),
                                    f"{type(exc).__name__}: {str(exc)[:120]}") from exc
        if self._memo is not None:
            self._memo[(backend, key)] = entry
        return entry

    def _report(self, exc: CorruptEntryError) -> None:
        cache = self.text_cache if exc.backend < 0 else self.latent_caches[exc.backend]
        users = sum(1 for refs in self.buckets.values() for r in refs
                    if (r.backend, r.latent) == (exc.backend, exc.key) or (exc.backend < 0 and r.text == exc.key))
        log.warning("%s; %d sample(s) use it and are skipped this run (replaced by another of their bucket); the entry "
                    "is removed so that the next start encodes it again (report: %s)", exc, users,
                    cache.store.describe(CORRUPT_REPORT))
        cache.quarantine(exc.key, exc.reason)


class UnusableBatchError(ValueError):
    """No sample of a batch's bucket can be read: the trainer takes the next batch instead."""


class CorruptEntryError(RuntimeError):
    """A cache entry that exists but does not decode."""

    def __init__(self, backend: int, key: str, name: str, reason: str) -> None:
        super().__init__(f"cache entry {name} is corrupt ({reason})")
        self.backend, self.key, self.name, self.reason = backend, key, name, reason


# ---------------------------------------------------------------- planning


def image_backends(config: TrainConfig) -> list[DataBackendConfig]:
    backends = [b for b in config.data_backends if b.dataset_type == "image" and not b.disabled]
    if not backends:
        raise ValueError("data_backend_config: no enabled image backend")
    for backend in backends:
        if backend.vae_cache_clear_each_epoch:
            raise NotImplementedError(f"data backend {backend.id!r}: vae_cache_clear_each_epoch is not built yet")
    if len(backends) > 1 and any(b.probability != 1.0 for b in backends):
        raise NotImplementedError("per-backend sampling 'probability' is not built yet: every sample is drawn "
                                  "once per epoch; remove 'probability' or set it to 1.0")
    return backends


def vae_cache_store(config: TrainConfig, backend: DataBackendConfig) -> FileStore:
    if backend.cache_dir_vae:
        return cache_store(backend, backend.cache_dir_vae)
    default = Path(config.output_dir) / "cache/vae" / backend.id  # never written into a data bucket unasked
    return cache_store(backend.model_copy(update={"type": "local"}), str(default))


def text_cache_store(config: TrainConfig) -> FileStore:
    text = [b for b in config.data_backends if b.dataset_type == "text_embeds" and not b.disabled and b.default]
    if text and text[0].cache_dir:
        return cache_store(text[0], text[0].cache_dir)
    return cache_store(DataBackendConfig(id="text", type="local", dataset_type="text_embeds"),
                       str(Path(config.output_dir) / "cache/text"))


def crop_settings(backend: DataBackendConfig) -> tuple[str, ...]:
    return ("crop", backend.crop_style, backend.crop_aspect) if backend.crop else ("cover", "center")


def target_bucket(record: ImageRecord, config: TrainConfig, backend: DataBackendConfig) -> Bucket:
    resolution = backend.resolution or config.resolution
    resolution_type = backend.resolution_type or config.resolution_type
    width, height = record.size
    if backend.crop and backend.crop_aspect == "square":
        width = height = 1  # SimpleTuner's crop_aspect square: every image trains square
    return bucket_for(width, height, resolution, resolution_type, config.aspect_bucket_rounding,
                      config.aspect_bucket_alignment)


@dataclass(frozen=True)
class ModelLimits:
    """The largest bucket side, in pixels, the transformer takes: its position embedding covers
    pos_embed_max_size patches per side, a patch is patch_size latents, a latent is vae_scale pixels
    (diffusers' SD3 pipeline: 2 ** (len(vae block_out_channels) - 1))."""

    pos_embed_max_size: int
    patch_size: int
    vae_scale: int

    @property
    def max_side(self) -> int:
        return self.pos_embed_max_size * self.patch_size * self.vae_scale

    @classmethod
    def of(cls, model_path: Path) -> ModelLimits | None:
        """From the model's transformer/ and vae/ config.json; None when the model sets no limit."""
        try:
            transformer = json.loads((Path(model_path) / "transformer" / "config.json").read_text())
            vae = json.loads((Path(model_path) / "vae" / "config.json").read_text())
        except (OSError, ValueError):
            log.debug("no transformer/vae config under %s: bucket sizes are not checked against the model", model_path)
            return None
        if not transformer.get("pos_embed_max_size") or "patch_size" not in transformer:
            return None
        return cls(int(transformer["pos_embed_max_size"]), int(transformer["patch_size"]),
                   2 ** (len(vae.get("block_out_channels", [0])) - 1))

    def problem(self, bucket: Bucket) -> str | None:
        width, height = bucket
        if max(width, height) <= self.max_side:
            return None
        return (f"too big for the model: its bucket {width}x{height} (aspect {max(width, height) / min(width, height):.1f}:1) "
                f"has a side over {self.max_side} px, the transformer's limit (pos_embed_max_size "
                f"{self.pos_embed_max_size} x patch_size {self.patch_size} x VAE scale {self.vae_scale})")


def _skip_words(config: TrainConfig, backend: DataBackendConfig) -> set[str]:
    return set(config.skip_file_discovery.split()) | set(backend.skip_file_discovery.replace(",", " ").split())


def plan_dataset(config: TrainConfig, model_path: Path) -> DatasetPlan:
    """Discover, bucket and key every sample; list what the caches hold. Loads no model."""
    backends = image_backends(config)
    vae_fp = component_fingerprint(config.pretrained_model_name_or_path, model_path, VAE_PARTS)
    text_fp = component_fingerprint(config.pretrained_model_name_or_path, model_path, TEXT_PARTS)
    text_cache = TensorCache(text_cache_store(config), config.compress_disk_cache)
    empty_key = text_key("", text_fp)
    plan = DatasetPlan(config, backends, [], text_cache, defaultdict(list), {}, {empty_key: ""}, empty_key)
    skip_text = False
    limits = ModelLimits.of(model_path)
    for index, backend in enumerate(backends):
        store, cache = image_store(backend), vae_cache_store(config, backend)
        plan.latent_caches.append(TensorCache(cache, config.compress_disk_cache))
        skip = _skip_words(config, backend)
        skip_text |= "text" in skip
        found = discover(backend, store, cache, backend.minimum_image_size or config.minimum_image_size,
                         trust_index=bool(skip & {"metadata", "aspect"}))
        if limits is not None:  # an image whose bucket the transformer cannot embed would end the run at its batch
            too_big = {r.key: reason for r in found.records
                       if (reason := limits.problem(target_bucket(r, config, backend)))}
            found.records = [r for r in found.records if r.key not in too_big]
            found.problems += sorted(too_big.items())
        report_problems(backend, store, cache, found.problems, config.delete_problematic_images)
        plan.problems += len(found.problems)
        if not found.records:
            raise ValueError(f"data backend {backend.id!r}: no usable images in {store.describe()}")
        present = set() if "vae" in skip else plan.latent_caches[-1].refresh()
        for record in found.records:
            bucket = target_bucket(record, config, backend)
            lkey = latent_key(record.digest, bucket, crop_settings(backend), vae_fp)
            tkey = text_key(record.caption, text_fp)
            plan.buckets[bucket].append(SampleRef(index, lkey, tkey))
            plan.captions[tkey] = record.caption
            if lkey not in plan.records and lkey not in present and "vae" not in skip:
                plan.missing_latents.append(lkey)
            plan.records[lkey] = (index, record, bucket)
    present_text = set() if skip_text else text_cache.refresh()
    plan.missing_text = [] if skip_text else sorted(set(plan.captions) - present_text)
    plan.buckets = dict(sorted(plan.buckets.items()))
    log.info("dataset: %d samples in %d aspect buckets %s; %d latent(s) and %d text embedding(s) to encode",
             sum(map(len, plan.buckets.values())), len(plan.buckets),
             {f"{w}x{h}": len(m) for (w, h), m in plan.buckets.items()}, len(plan.missing_latents), len(plan.missing_text))
    return plan


def drop_samples(plan: DatasetPlan, failed: set[str]) -> None:
    """Remove samples whose latents could not be encoded (the image decoded at discovery, not at encode)."""
    for bucket in list(plan.buckets):
        plan.buckets[bucket] = [r for r in plan.buckets[bucket] if r.latent not in failed]
        if not plan.buckets[bucket]:
            del plan.buckets[bucket]


def open_dataset(plan: DatasetPlan, stats: BuildStats | None = None,
                 memory_budget: int = MEMORY_BUDGET) -> EncodedDataset:
    return EncodedDataset(plan.buckets, plan.latent_caches, plan.text_cache, plan.empty_key, memory_budget, stats)


# ---------------------------------------------------------------- pixels


def load_pixels(data: bytes, bucket: Bucket, backend: DataBackendConfig, seed: int = 0) -> torch.Tensor:
    """Resize to cover the bucket, crop to it; (3, H, W) in [-1, 1].

    crop_style picks the window: centre, top-left corner, or a random one drawn from `seed`
    (the image's hash), so the cached latent stays a pure function of the cache key.
    """
    width, height = bucket
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
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


# ---------------------------------------------------------------- the trainer's seam


def encode_dataset(config: TrainConfig, model_path: Path, device: torch.device, dtype: torch.dtype) -> EncodedDataset:
    """Plan the dataset, encode whatever the caches lack (loading only the encoders needed), then
    open it for reading from the caches alone."""
    from relay_train.data.encode import build_missing

    plan = plan_dataset(config, model_path)
    stats = BuildStats()
    if not plan.complete:
        stats = build_missing(plan, model_path, device, dtype)
    return open_dataset(plan, stats)
