"""Content-keyed caches of VAE latents and text embeddings.

An entry's key is a sha256 over everything that decides its value: the image bytes (or the
caption text), the model and the component's config, and the resolution / crop settings. So a
changed image or caption gets a new key and is recomputed, and an unchanged one is found and never
is. The encoder's dtype is deliberately not part of a key: a cache built on GPUs in bf16 serves a
CPU run, and the reader upcasts. Entries are safetensors blobs, gzip-compressed with
--compress_disk_cache; a reader accepts either form, so flipping the flag never invalidates a cache.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from relay_train.data.store import FileStore

CACHE_FORMAT = 1  # bump when the stored layout changes: every key changes with it
SUFFIX, GZ_SUFFIX = ".safetensors", ".safetensors.gz"
CLIP_TOKENS, T5_TOKENS = 77, 154  # the seed's dataset notes; SD3 sequence = 77 + 154 = 231
CORRUPT_REPORT = "corrupt_cache_entries.json"  # entries found corrupt and removed, beside them

log = logging.getLogger(__name__)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _key(*parts: Any) -> str:
    return digest(json.dumps([CACHE_FORMAT, *parts], sort_keys=True, default=str).encode())


def component_fingerprint(model_id: str, model_path: Path, components: tuple[str, ...]) -> str:
    """The model as a cache sees it: its id plus each component's config.json.

    Weights are not hashed (the T5 encoder alone is ~9 GB); the id and the configs change with
    any real model change. A cache dir reused across *different random-weight* models with the
    same id would go stale: give each its own cache dir.
    """
    parts: list[str] = [model_id]
    for name in components:
        config = Path(model_path) / name / "config.json"
        parts.append(digest(config.read_bytes()) if config.is_file() else f"{name}:absent")
    return _key("model", *parts)


def latent_key(image_digest: str, bucket: tuple[int, int], crop: tuple[str, ...], vae_fingerprint: str) -> str:
    """Same image bytes, same target (W, H), same crop, same VAE → same latents."""
    return _key("latent", image_digest, list(bucket), list(crop), vae_fingerprint)


def text_key(caption: str, text_fingerprint: str) -> str:
    return _key("text", caption, CLIP_TOKENS, T5_TOKENS, text_fingerprint)


def pack(tensors: dict[str, torch.Tensor], compress: bool) -> bytes:
    blob = st_save({k: v.contiguous() for k, v in tensors.items()})
    # mtime=0 keeps compressed entries byte-identical for identical tensors.
    return gzip.compress(blob, compresslevel=3, mtime=0) if compress else blob


def unpack(blob: bytes) -> dict[str, torch.Tensor]:
    if blob[:2] == b"\x1f\x8b":  # the gzip magic number
        blob = gzip.decompress(blob)
    return st_load(blob)


class TensorCache:
    """Entries `<key>.safetensors[.gz]` in one folder of a FileStore."""

    def __init__(self, store: FileStore, compress: bool = False) -> None:
        self.store, self.compress = store, compress
        self._names: dict[str, str] = {}  # key → stored name, from the last listing
        self._sizes: dict[str, int] = {}

    def describe(self) -> str:
        return self.store.describe()

    def refresh(self) -> set[str]:
        """List the folder once (one LIST per 1000 entries on S3) and return the keys present."""
        self._names.clear()
        self._sizes.clear()
        for info in self.store.list():
            if "/" in info.key:
                continue
            for suffix in (GZ_SUFFIX, SUFFIX):
                if info.key.endswith(suffix):
                    key = info.key[: -len(suffix)]
                    self._names[key], self._sizes[key] = info.key, info.size
                    break
        return set(self._names)

    def size_of(self, key: str) -> int:
        return self._sizes.get(key, 0)

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        name, blob = key + (GZ_SUFFIX if self.compress else SUFFIX), pack(tensors, self.compress)
        self.store.write(name, blob)
        self._names[key], self._sizes[key] = name, len(blob)

    def get(self, key: str) -> dict[str, torch.Tensor]:
        return unpack(self.store.read(self._name(key)))

    def _name(self, key: str) -> str:
        return self._names.get(key, key + (GZ_SUFFIX if self.compress else SUFFIX))

    def describe_entry(self, key: str) -> str:
        return self.store.describe(self._name(key))

    def quarantine(self, key: str, reason: str) -> None:
        """Remove a corrupt entry (so the next plan sees it missing and encodes it again) and list it in
        CORRUPT_REPORT. Best effort: a read-only cache keeps the entry, and the caller skips it anyway."""
        name = self._name(key)
        try:
            self.store.delete(name)
        except Exception as exc:  # noqa: BLE001 - a read-only or vanished entry: the report still says why
            log.warning("could not remove corrupt cache entry %s: %s", self.store.describe(name), exc)
        self._names.pop(key, None)
        self._sizes.pop(key, None)
        try:
            report = json.loads(self.store.read(CORRUPT_REPORT))
            entries = report["entries"] if isinstance(report, dict) and isinstance(report.get("entries"), list) else []
        except (FileNotFoundError, ValueError):
            entries = []
        entries.append({"entry": name, "reason": reason, "removed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        try:
            self.store.write(CORRUPT_REPORT, json.dumps({"entries": entries[-1000:]}, indent=2).encode())
        except Exception as exc:  # noqa: BLE001 - the warning in the log already names the entry
            log.warning("could not write %s: %s", self.store.describe(CORRUPT_REPORT), exc)
