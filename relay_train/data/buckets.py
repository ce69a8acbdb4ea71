"""Aspect buckets and the resumable batch sampler. Pure: no I/O, no model."""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

Bucket = tuple[int, int]  # (width, height) in pixels


def bucket_for(width: int, height: int, resolution: float, resolution_type: str, rounding: int, alignment: int) -> Bucket:
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


Batch = tuple[Bucket, list[int]]


@dataclass
class BucketBatchSampler:
    """Yields (bucket, sample indices) global batches; a batch never mixes buckets.

    An epoch is a pure function of (seed, epoch): each bucket's samples in a shuffled order, cut
    into batches in that order, and a shuffled sequence saying which bucket the next batch comes
    from. Every rank runs the same sampler over global batches (train_batch_size × workers) and
    trains on its share of each (relay_train.parallel.shard_of), so all ranks take the same
    number of steps and collective calls stay in step.

    Because a bucket's samples are always taken front to back, "how far into each bucket" says
    exactly what an epoch has consumed. The state keeps that (`start`, where this stretch of the
    epoch began) with the position since; a resume with another batch size (another number of
    workers) cuts the rest of each bucket anew, so no sample repeats and none is skipped beyond
    the usual trimming (a bucket's last partial batch).
    """

    bucket_sizes: dict[Bucket, int]
    batch_size: int
    seed: int
    keep_partial_batches: bool = False  # disable_bucket_pruning: small buckets still train
    epoch: int = 0
    position: int = 0  # batches taken since `start`
    start: dict[Bucket, int] = field(default_factory=dict)  # samples per bucket consumed before this stretch
    _order: list[Batch] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.batches_per_epoch() == 0:
            raise ValueError(
                f"no full batch of {self.batch_size} (train_batch_size × workers) fits any aspect bucket "
                f"{dict(self.bucket_sizes)}: add images, lower --train_batch_size, "
                "or set --disable_bucket_pruning true"
            )

    def global_batches(self, epoch: int, start: dict[Bucket, int] | None = None, batch_size: int | None = None) -> list[Batch]:
        """Every batch of the epoch from `start` on, in order."""
        start, batch_size = start or {}, batch_size or self.batch_size
        chunks: dict[Bucket, list[list[int]]] = {}
        for bucket in sorted(self.bucket_sizes):
            order = list(range(self.bucket_sizes[bucket]))
            random.Random(f"{self.seed}:{epoch}:{bucket}").shuffle(order)
            rest = order[start.get(bucket, 0) :]
            chunks[bucket] = [
                rest[i : i + batch_size]
                for i in range(0, len(rest), batch_size)
                if len(rest[i : i + batch_size]) == batch_size or self.keep_partial_batches
            ]
        labels = [bucket for bucket in sorted(chunks) for _ in chunks[bucket]]
        where = ":".join(f"{start[b]}" for b in sorted(start) if start[b])  # a fresh epoch: ""
        random.Random(f"{self.seed}:{epoch}:{where}").shuffle(labels)
        taken = dict.fromkeys(chunks, 0)
        batches = []
        for bucket in labels:  # the k-th batch of a bucket is its k-th chunk: front to back
            batches.append((bucket, chunks[bucket][taken[bucket]]))
            taken[bucket] += 1
        return batches

    def batches_per_epoch(self) -> int:
        """Batches in a whole epoch (the stretch after a re-cut may be shorter)."""
        return len(self.global_batches(0))

    def next_batch(self) -> Batch:
        if self._order is None:
            self._order = self.global_batches(self.epoch, self.start)
        if self.position >= len(self._order):  # at most once: a fresh epoch always has a batch
            self.epoch, self.position, self.start = self.epoch + 1, 0, {}
            self._order = self.global_batches(self.epoch)
        batch = self._order[self.position]
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "start": [[w, h, n] for (w, h), n in sorted(self.start.items())],
            "buckets": [[w, h, n] for (w, h), n in sorted(self.bucket_sizes.items())],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore exactly when the batch size matches; otherwise continue each bucket where it stopped."""
        if state["seed"] != self.seed:
            raise ValueError(f"sampler state was saved with seed {state['seed']}, this run uses {self.seed}")
        saved = {(w, h): n for w, h, n in state.get("buckets", [])}
        if saved and saved != dict(self.bucket_sizes):
            log.warning(
                "sampler: the dataset's buckets changed since the checkpoint (%d → %d samples): "
                "epoch %d's order differs from the one it started with",
                sum(saved.values()),
                sum(self.bucket_sizes.values()),
                state["epoch"],
            )
        size = state.get("batch_size", self.batch_size)
        start = {(w, h): n for w, h, n in state.get("start", [])}
        self.epoch, self.position, self.start, self._order = state["epoch"], state["position"], start, None
        if size == self.batch_size:
            return
        done = self.global_batches(self.epoch, start, size)[: state["position"]]
        consumed = dict(start)
        for bucket, indices in done:
            consumed[bucket] = consumed.get(bucket, 0) + len(indices)
        self.start, self.position = consumed, 0
        log.warning(
            "sampler: resuming epoch %d with batches of %d (saved with %d): %d samples of the epoch "
            "were done and are not repeated; the rest of each bucket is cut into new batches",
            self.epoch,
            self.batch_size,
            size,
            sum(consumed.values()),
        )
