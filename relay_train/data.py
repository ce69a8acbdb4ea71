"""The simple local-folder dataset: discover images + captions, bucket them, encode them once.

This is the seam the full data pipeline (issue 3: S3 backends, on-disk caches, Ray Data
precompute) replaces: the trainer only sees an `EncodedDataset` and a `BucketBatchSampler`.
Encoding happens once at start-up, in memory; the VAE and the text encoders are freed before
the transformer is loaded.
"""

from __future__ import annotations

import gc
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from relay_train.buckets import Bucket, bucket_for
from relay_train.config import DataBackendConfig, TrainConfig
from relay_train.flow import normalize_latents

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
CLIP_TOKENS, T5_TOKENS = 77, 154  # the seed's dataset notes; SD3 sequence = 77 + 154 = 231


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    caption: str
    size: tuple[int, int]  # (width, height) as stored


@dataclass
class BucketTensors:
    latents: torch.Tensor  # (N, 16, H/8, W/8), normalised: (z − shift)·scale
    prompt_embeds: torch.Tensor  # (N, 231, joint_attention_dim)
    pooled_embeds: torch.Tensor  # (N, pooled_projection_dim)


@dataclass
class EncodedDataset:
    buckets: dict[Bucket, BucketTensors]
    empty_prompt_embeds: torch.Tensor  # (231, D): caption dropout swaps to these
    empty_pooled_embeds: torch.Tensor

    def bucket_sizes(self) -> dict[Bucket, int]:
        return {b: t.latents.shape[0] for b, t in self.buckets.items()}

    def batch(self, bucket: Bucket, indices: list[int]) -> BucketTensors:
        t, idx = self.buckets[bucket], torch.tensor(indices)
        return BucketTensors(t.latents[idx], t.prompt_embeds[idx], t.pooled_embeds[idx])


def read_caption(image: Path, strategy: str, instance_prompt: str | None) -> str:
    if strategy == "textfile":
        text = image.with_suffix(".txt")
        if not text.is_file():
            raise FileNotFoundError(f"{image.name}: no caption file {text.name} (caption_strategy textfile)")
        return text.read_text(encoding="utf-8").strip()
    if strategy == "filename":
        return image.stem.replace("_", " ").strip()
    if strategy == "instanceprompt":
        return instance_prompt or ""
    raise NotImplementedError(f"caption_strategy {strategy!r} arrives with the data pipeline (issue 3)")


def discover_images(backend: DataBackendConfig, minimum_size: float, delete_problematic: bool) -> list[ImageRecord]:
    """Every readable image under instance_data_dir. Corrupt, too small or uncaptioned files are skipped
    and listed in one warning; with delete_problematic_images, unreadable ones are also deleted."""
    root = Path(backend.instance_data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data backend {backend.id!r}: instance_data_dir {root} is not a folder")
    records, skipped = [], []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            with Image.open(path) as im:
                im.verify()  # catches truncated / corrupt files without decoding twice
            with Image.open(path) as im:
                size = im.size
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            skipped.append(f"{path.name}: unreadable ({exc.__class__.__name__})")
            if delete_problematic:
                path.unlink(missing_ok=True)
            continue
        if minimum_size and min(size) < minimum_size:
            skipped.append(f"{path.name}: {size[0]}x{size[1]} is under minimum_image_size {minimum_size:g}")
            continue
        try:
            caption = read_caption(path, backend.caption_strategy, backend.instance_prompt)
        except FileNotFoundError as exc:
            skipped.append(str(exc))
            continue
        records.extend([ImageRecord(path, caption, size)] * (1 + backend.repeats))
    if skipped:
        log.warning("data backend %r: skipped %d image(s): %s", backend.id, len(skipped), "; ".join(skipped[:10]))
    if not records:
        raise ValueError(f"data backend {backend.id!r}: no usable images in {root}")
    return records


def load_pixels(path: Path, bucket: Bucket) -> torch.Tensor:
    """Resize to cover the bucket, centre-crop to it; (3, H, W) in [-1, 1]."""
    width, height = bucket
    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = max(width / im.width, height / im.height)
        im = im.resize((max(width, round(im.width * scale)), max(height, round(im.height * scale))), Image.BICUBIC)
        left, top = (im.width - width) // 2, (im.height - height) // 2
        im = im.crop((left, top, left + width, top + height))
        array = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


def assign_buckets(records: list[ImageRecord], config: TrainConfig, backend: DataBackendConfig) -> dict[Bucket, list[ImageRecord]]:
    resolution = backend.resolution or config.resolution
    resolution_type = backend.resolution_type or config.resolution_type
    grouped: dict[Bucket, list[ImageRecord]] = defaultdict(list)
    for record in records:
        bucket = bucket_for(*record.size, resolution, resolution_type, config.aspect_bucket_rounding, config.aspect_bucket_alignment)
        grouped[bucket].append(record)
    return dict(grouped)


def image_backends(config: TrainConfig) -> list[DataBackendConfig]:
    backends = [b for b in config.data_backends if b.dataset_type == "image" and not b.disabled]
    for backend in backends:
        if backend.type != "local":
            raise NotImplementedError(
                f"data backend {backend.id!r} is type {backend.type!r}: only 'local' image backends "
                "train until the data pipeline lands (issue 3)"
            )
    if not backends:
        raise ValueError("data_backend_config: no enabled image backend")
    return backends


@torch.no_grad()
def encode_dataset(config: TrainConfig, model_path: Path, device: torch.device, dtype: torch.dtype) -> EncodedDataset:
    """Load the VAE and text encoders, encode every image and caption once, free the encoders."""
    from diffusers import StableDiffusion3Pipeline

    grouped: dict[Bucket, list[ImageRecord]] = defaultdict(list)
    for backend in image_backends(config):
        records = discover_images(backend, backend.minimum_image_size or config.minimum_image_size, config.delete_problematic_images)
        for bucket, members in assign_buckets(records, config, backend).items():
            grouped[bucket].extend(members)
    log.info("dataset: %d samples in %d aspect buckets %s", sum(map(len, grouped.values())), len(grouped),
             {f"{w}x{h}": len(m) for (w, h), m in sorted(grouped.items())})

    pipe = StableDiffusion3Pipeline.from_pretrained(model_path, transformer=None, dtype=dtype, local_files_only=True)
    pipe.to(device)
    empty = _encode_prompts(pipe, [""], device)
    generator = torch.Generator().manual_seed(config.seed)  # one fixed VAE posterior draw per image
    buckets = {}
    for bucket, members in sorted(grouped.items()):
        latents = _encode_images(pipe.vae, [r.path for r in members], bucket, config.vae_batch_size, generator, device, dtype)
        prompt_embeds, pooled = _encode_prompts(pipe, [r.caption for r in members], device)
        buckets[bucket] = BucketTensors(latents, prompt_embeds, pooled)
    del pipe
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return EncodedDataset(buckets, empty[0][0], empty[1][0])


def _encode_images(vae, paths: list[Path], bucket: Bucket, batch_size: int, generator: torch.Generator,
                   device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    out = []
    for start in range(0, len(paths), batch_size):
        pixels = torch.stack([load_pixels(p, bucket) for p in paths[start : start + batch_size]])
        dist = vae.encode(pixels.to(device, dtype)).latent_dist
        noise = torch.randn(dist.mean.shape, generator=generator).to(device, dtype)
        sample = dist.mean + dist.std * noise
        out.append(normalize_latents(sample.float(), vae.config.shift_factor, vae.config.scaling_factor).cpu())
    return torch.cat(out)


def _encode_prompts(pipe, captions: list[str], device: torch.device, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    embeds, pooled = [], []
    for start in range(0, len(captions), batch_size):
        chunk = captions[start : start + batch_size]
        e, _, p, _ = pipe.encode_prompt(prompt=chunk, prompt_2=chunk, prompt_3=chunk, device=device,
                                        do_classifier_free_guidance=False, max_sequence_length=T5_TOKENS)
        embeds.append(e.float().cpu())
        pooled.append(p.float().cpu())
    return torch.cat(embeds), torch.cat(pooled)
