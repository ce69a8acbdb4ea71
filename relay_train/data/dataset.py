"""The dataset the trainer sees: aspect-bucketed samples read from the latent and text-embed caches.

It reads cache entries only: planning is relay_train.data.plan, encoding what the caches lack is
relay_train.data.encode (whose `encode_dataset` plans, encodes and opens: the trainer's seam).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from relay_train.data.buckets import Bucket
from relay_train.data.caches import CORRUPT_REPORT, TensorCache
from relay_train.data.plan import DatasetPlan, SampleRef

log = logging.getLogger(__name__)

MEMORY_BUDGET = 1 << 30  # keep decoded entries in RAM when the whole cache is under this


@dataclass
class BucketTensors:
    latents: torch.Tensor  # (N, 16, H/8, W/8), normalised: (z − shift)·scale
    prompt_embeds: torch.Tensor  # (N, 231, joint_attention_dim)
    pooled_embeds: torch.Tensor  # (N, pooled_projection_dim)


@dataclass
class BuildStats:
    latents: int = 0  # entries encoded by this call (0 when the caches were complete)
    text: int = 0
    failed: int = 0


class EncodedDataset:
    """Samples by bucket; `batch` reads their cache entries (in parallel, for S3).

    A cache entry that does not decode (truncated, corrupted) never ends the run: it is reported with
    its name, removed from the cache so that the next start encodes it again, and every sample that
    uses it is replaced, for the rest of this run, by the next usable sample of its bucket (so batch
    shapes, and the data order of every other sample, are unchanged on every rank)."""

    def __init__(
        self,
        buckets: dict[Bucket, list[SampleRef]],
        latent_caches: list[TensorCache],
        text_cache: TensorCache,
        empty_key: str,
        memory_budget: int = MEMORY_BUDGET,
        stats: BuildStats | None = None,
    ) -> None:
        self.buckets, self.latent_caches, self.text_cache = buckets, latent_caches, text_cache
        self.stats = stats or BuildStats()
        total = sum(
            self.latent_caches[r.backend].size_of(r.latent) + text_cache.size_of(r.text)
            for refs in buckets.values()
            for r in refs
        )
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
        latents, texts = entries[: len(refs)], entries[len(refs) :]
        return BucketTensors(
            torch.stack([e["latents"] for e in latents]),
            torch.stack([e["prompt_embeds"] for e in texts]),
            torch.stack([e["pooled_embeds"] for e in texts]),
        )

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
            raise CorruptEntryError(backend, key, cache.describe_entry(key), f"{type(exc).__name__}: {str(exc)[:120]}") from exc
        if self._memo is not None:
            self._memo[(backend, key)] = entry
        return entry

    def _report(self, exc: CorruptEntryError) -> None:
        cache = self.text_cache if exc.backend < 0 else self.latent_caches[exc.backend]
        users = sum(
            1
            for refs in self.buckets.values()
            for r in refs
            if (r.backend, r.latent) == (exc.backend, exc.key) or (exc.backend < 0 and r.text == exc.key)
        )
        log.warning(
            "%s; %d sample(s) use it and are skipped this run (replaced by another of their bucket); the entry "
            "is removed so that the next start encodes it again (report: %s)",
            exc,
            users,
            cache.store.describe(CORRUPT_REPORT),
        )
        cache.quarantine(exc.key, exc.reason)


class UnusableBatchError(ValueError):
    """No sample of a batch's bucket can be read: the trainer takes the next batch instead."""


class CorruptEntryError(RuntimeError):
    """A cache entry that exists but does not decode."""

    def __init__(self, backend: int, key: str, name: str, reason: str) -> None:
        super().__init__(f"cache entry {name} is corrupt ({reason})")
        self.backend, self.key, self.name, self.reason = backend, key, name, reason


def open_dataset(plan: DatasetPlan, stats: BuildStats | None = None, memory_budget: int = MEMORY_BUDGET) -> EncodedDataset:
    return EncodedDataset(plan.buckets, plan.latent_caches, plan.text_cache, plan.empty_key, memory_budget, stats)
