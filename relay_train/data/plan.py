"""The dataset plan: every image backend discovered (local or S3), each image bucketed and its cache
entries keyed, and what the caches already hold. Loads no model and encodes nothing.

A plan is made once per run, by rank 0 alone on a multi-rank run (discovery writes `index.json` and
`problematic_images.json`, and may delete bad files): the other ranks receive it pickled (its stores
pickle without their filesystem handles and reopen them where they land).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from relay_train.config import DataBackendConfig, TrainConfig
from relay_train.data.buckets import Bucket, bucket_for
from relay_train.data.caches import TensorCache, component_fingerprint, latent_key, text_key
from relay_train.data.decode import DECODE_VERSION
from relay_train.data.discovery import ImageRecord, discover, report_problems
from relay_train.data.store import FileStore, cache_store, image_store

log = logging.getLogger(__name__)

VAE_PARTS, TEXT_PARTS = ("vae",), ("text_encoder", "text_encoder_2", "text_encoder_3")


@dataclass(frozen=True)
class SampleRef:
    backend: int  # index into DatasetPlan.backends / latent_caches
    latent: str  # latent cache key
    text: str  # text cache key


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


def image_backends(config: TrainConfig) -> list[DataBackendConfig]:
    backends = [b for b in config.data_backends if b.dataset_type == "image" and not b.disabled]
    if not backends:
        raise ValueError("data_backend_config: no enabled image backend")
    for backend in backends:
        if backend.vae_cache_clear_each_epoch:
            raise NotImplementedError(f"data backend {backend.id!r}: vae_cache_clear_each_epoch is not built yet")
    if len(backends) > 1 and any(b.probability != 1.0 for b in backends):
        raise NotImplementedError(
            "per-backend sampling 'probability' is not built yet: every sample is drawn "
            "once per epoch; remove 'probability' or set it to 1.0"
        )
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
    return cache_store(
        DataBackendConfig(id="text", type="local", dataset_type="text_embeds"), str(Path(config.output_dir) / "cache/text")
    )


def crop_settings(backend: DataBackendConfig) -> tuple[str, ...]:
    """How pixels become a latent, in its cache key: the decoder's version, then the crop."""
    crop = ("crop", backend.crop_style, backend.crop_aspect) if backend.crop else ("cover", "center")
    return (f"decode-{DECODE_VERSION}", *crop)


def target_bucket(record: ImageRecord, config: TrainConfig, backend: DataBackendConfig) -> Bucket:
    resolution = backend.resolution or config.resolution
    resolution_type = backend.resolution_type or config.resolution_type
    width, height = record.size
    if backend.crop and backend.crop_aspect == "square":
        width = height = 1  # SimpleTuner's crop_aspect square: every image trains square
    return bucket_for(width, height, resolution, resolution_type, config.aspect_bucket_rounding, config.aspect_bucket_alignment)


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
        return cls(
            int(transformer["pos_embed_max_size"]),
            int(transformer["patch_size"]),
            2 ** (len(vae.get("block_out_channels", [0])) - 1),
        )

    def problem(self, bucket: Bucket) -> str | None:
        width, height = bucket
        if max(width, height) <= self.max_side:
            return None
        return (
            f"too big for the model: its bucket {width}x{height} (aspect {max(width, height) / min(width, height):.1f}:1) "
            f"has a side over {self.max_side} px, the transformer's limit (pos_embed_max_size "
            f"{self.pos_embed_max_size} x patch_size {self.patch_size} x VAE scale {self.vae_scale})"
        )


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
        found = discover(
            backend,
            store,
            cache,
            backend.minimum_image_size or config.minimum_image_size,
            trust_index=bool(skip & {"metadata", "aspect"}),
        )
        if limits is not None:  # an image whose bucket the transformer cannot embed would end the run at its batch
            too_big = {r.key: reason for r in found.records if (reason := limits.problem(target_bucket(r, config, backend)))}
            found.records = [r for r in found.records if r.key not in too_big]
            found.problems += sorted(too_big.items())
        report_problems(backend, store, cache, found.problems, config.delete_problematic_images, found.empty_captions)
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
    log.info(
        "dataset: %d samples in %d aspect buckets %s; %d latent(s) and %d text embedding(s) to encode",
        sum(map(len, plan.buckets.values())),
        len(plan.buckets),
        {f"{w}x{h}": len(m) for (w, h), m in plan.buckets.items()},
        len(plan.missing_latents),
        len(plan.missing_text),
    )
    return plan


def drop_samples(plan: DatasetPlan, failed: set[str]) -> None:
    """Remove samples whose latents could not be encoded (the image decoded at discovery, not at encode)."""
    for bucket in list(plan.buckets):
        plan.buckets[bucket] = [r for r in plan.buckets[bucket] if r.latent not in failed]
        if not plan.buckets[bucket]:
            del plan.buckets[bucket]
