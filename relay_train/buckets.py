"""Aspect buckets and the resumable, rank-sharded batch sampler. Pure: no I/O, no model."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

Bucket = tuple[int, int]  # (width, height) in pixels


def bucket_for(
    width: int, height: int, resolution: float, resolution_type: str, rounding: int, alignment: int
) -> Bucket:
    """The (W, H) an image is resized and cropped to.

    pixel_area: W·H ≈ resolution², W/H ≈ the image's aspect rounded to `rounding` decimals.
    pixel: the shorter side becomes `resolution`, the longer keeps the rounded aspect.
    Both sides snap to a multiple of `alignment` (the VAE's 8× times the 2×2 patch, or coarser).
    """
    aspect = round(width / height, rounding)
    if aspect <= 0:
        aspect = width / height
    if resolution_type == "pixel_area":
        w, h = math.sqrt(resolution * resolution * aspect), math.sqrt(resolution * resolution / aspect)
    elif width >= height:
        w, h = resolution * aspect, resolution
    else:
        w, h = resolution, resolution / aspect
    return _snap(w, alignment), _snap(h, alignment)


def _snap(side: float, alignment: int) -> int:
    return max(alignment, int(round(side / alignment)) * alignment)


@dataclass
class BucketBatchSampler:
    """Yields (bucket, sample indices) batches; a batch never mixes buckets.

    Epoch e's order is a pure function of (seed, e), so the sampler's whole state is
    (epoch, position): a resumed run replays exactly the batches an uninterrupted one would.
    Each rank takes every world_size-th batch, and every rank gets the same count (the epoch is
    trimmed to a multiple of world_size) so collective calls stay in step.
    """

    bucket_sizes: dict[Bucket, int]
    batch_size: int
    seed: int
    keep_partial_batches: bool = False  # disable_bucket_pruning: small buckets still train
    rank: int = 0
    world_size: int = 1
    epoch: int = 0
    position: int = 0
    _order: list[tuple[Bucket, list[int]]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.batches_per_epoch() == 0:
            raise ValueError(
                f"no full batch of {self.batch_size} fits any aspect bucket {dict(self.bucket_sizes)} "
                f"across {self.world_size} rank(s): add images, lower --train_batch_size, "
                "or set --disable_bucket_pruning true"
            )

    def _epoch_batches(self, epoch: int) -> list[tuple[Bucket, list[int]]]:
        rng = random.Random(f"{self.seed}:{epoch}")
        batches = []
        for bucket in sorted(self.bucket_sizes):
            indices = list(range(self.bucket_sizes[bucket]))
            rng.shuffle(indices)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                if len(chunk) == self.batch_size or self.keep_partial_batches:
                    batches.append((bucket, chunk))
        rng.shuffle(batches)
        usable = len(batches) - len(batches) % self.world_size
        return batches[self.rank : usable : self.world_size]

    def batches_per_epoch(self) -> int:
        return len(self._epoch_batches(0))

    def next_batch(self) -> tuple[Bucket, list[int]]:
        if self._order is None:
            self._order = self._epoch_batches(self.epoch)
        if self.position >= len(self._order):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._epoch_batches(self.epoch)
        batch = self._order[self.position]
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"sampler state was saved with seed {state['seed']}, this run uses {self.seed}")
        self.epoch, self.position, self._order = state["epoch"], state["position"], None
