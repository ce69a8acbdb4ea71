"""Checkpoints: what one holds, how it is written (manifest last, then an atomic rename), how it is
verified and read back, and the local store that keeps the newest N.

A checkpoint is complete only when manifest.json is present and every file it lists has the
listed size and sha256. Anything else is never loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ADAPTER, ADAPTER_EMA = "adapter.safetensors", "adapter_ema.safetensors"
OPTIMIZER, SCHEDULER, RNG = "optimizer.pt", "scheduler.pt", "rng_state.pt"
TRAINING_STATE, CONFIG = "training_state.json", "config.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, corrupt, or does not belong to this run."""


@dataclass
class CheckpointPayload:
    step: int
    adapter: dict[str, torch.Tensor]
    adapter_metadata: dict[str, str]  # safetensors metadata: lycoris config, step, model spec
    ema: dict[str, torch.Tensor] | None
    optimizer: dict
    scheduler: dict
    rng: dict
    training_state: dict  # JSON: step, sampler position, ...
    config_json: str  # the resolved config, secrets masked


def capture_rng(generator: torch.Generator) -> dict:
    """Every RNG a step may touch: ours (the step's generator) and the global torch/numpy/python/CUDA ones."""
    np_state = np.random.get_state()
    return {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "python": random.getstate(),
    }


def restore_rng(state: dict, generator: torch.Generator) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def save_adapters(adapter: dict[str, torch.Tensor], ema: dict[str, torch.Tensor] | None, metadata: dict[str, str],
                  path: Path, ema_path: Path) -> list[Path]:
    """The adapter (and its EMA twin, when kept) as LyCORIS-named safetensors; used by checkpoints and export."""
    save_file(adapter, str(path), metadata=metadata)
    if ema is None:
        return [path]
    save_file(ema, str(ema_path), metadata={**metadata, "ema": "true"})
    return [path, ema_path]


def write_checkpoint(folder: Path, payload: CheckpointPayload) -> None:
    """Write every file, then the manifest of their sizes and hashes, last."""
    folder.mkdir(parents=True, exist_ok=True)
    save_adapters(payload.adapter, payload.ema, payload.adapter_metadata, folder / ADAPTER, folder / ADAPTER_EMA)
    torch.save(payload.optimizer, folder / OPTIMIZER)
    torch.save(payload.scheduler, folder / SCHEDULER)
    torch.save(payload.rng, folder / RNG)
    (folder / TRAINING_STATE).write_text(json.dumps(payload.training_state, indent=2, sort_keys=True))
    (folder / CONFIG).write_text(payload.config_json)
    files = {
        p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.iterdir())
        if p.name != MANIFEST
    }
    manifest = {"format": 1, "step": payload.step, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))


def verify_checkpoint(folder: Path, check_hashes: bool = True) -> dict:
    """The manifest, if the folder is a complete checkpoint; CheckpointError naming the defect otherwise."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{folder}: no {MANIFEST} (the write never finished)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{folder}: unreadable {MANIFEST}: {exc}") from exc
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{folder}: {name} is listed in the manifest but missing")
        if path.stat().st_size != entry["size"]:
            raise CheckpointError(f"{folder}: {name} is {path.stat().st_size} bytes, manifest says {entry['size']}")
        if check_hashes and sha256_file(path) != entry["sha256"]:
            raise CheckpointError(f"{folder}: {name} does not match its sha256 in the manifest")
    return manifest


def read_checkpoint(folder: Path) -> CheckpointPayload:
    manifest = verify_checkpoint(folder)
    from safetensors import safe_open

    with safe_open(str(folder / ADAPTER), framework="pt") as fh:
        metadata = fh.metadata() or {}
    return CheckpointPayload(
        step=manifest["step"],
        adapter=load_file(str(folder / ADAPTER)),
        adapter_metadata=metadata,
        ema=load_file(str(folder / ADAPTER_EMA)) if (folder / ADAPTER_EMA).is_file() else None,
        optimizer=torch.load(folder / OPTIMIZER, map_location="cpu", weights_only=True),
        scheduler=torch.load(folder / SCHEDULER, map_location="cpu", weights_only=True),
        rng=torch.load(folder / RNG, map_location="cpu", weights_only=True),
        training_state=json.loads((folder / TRAINING_STATE).read_text()),
        config_json=(folder / CONFIG).read_text(),
    )


def checkpoint_step(folder: Path) -> int | None:
    match = _NAME.match(folder.name)
    return int(match.group(1)) if match else None


def keep_newest(steps: list[int], limit: int | None) -> tuple[list[int], list[int]]:
    """Policy: (kept, pruned) when only the newest `limit` checkpoints survive."""
    ordered = sorted(steps, reverse=True)
    if limit is None:
        return ordered, []
    return ordered[:limit], ordered[limit:]


class CheckpointIO(Protocol):
    """Where the trainer writes checkpoints. The orchestrator may wrap or replace it."""

    def save(self, payload: CheckpointPayload) -> Path: ...

    def latest(self) -> Path | None: ...


class LocalCheckpointStore:
    """`<root>/checkpoint-<step>/` folders; written under a `.partial` name and renamed when complete."""

    def __init__(self, root: Path, keep: int | None = None):
        self.root, self.keep = Path(root), keep

    def save(self, payload: CheckpointPayload) -> Path:
        final = self.root / f"checkpoint-{payload.step}"
        partial = self.root / f"checkpoint-{payload.step}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        write_checkpoint(partial, payload)
        if final.exists():  # the same step saved again (an emergency save right after a scheduled one)
            shutil.rmtree(final)
        partial.rename(final)  # atomic on one filesystem: readers see all of it or none
        self.prune()
        return final

    def checkpoints(self) -> list[Path]:
        """Complete-looking checkpoint folders (manifest present), newest first; hashes are checked on load."""
        found = [p for p in self.root.glob("checkpoint-*") if checkpoint_step(p) is not None and (p / MANIFEST).is_file()]
        return sorted(found, key=checkpoint_step, reverse=True)

    def latest(self) -> Path | None:
        for folder in self.checkpoints():
            try:
                verify_checkpoint(folder)
                return folder
            except CheckpointError as exc:
                log.warning("skipping incomplete checkpoint: %s", exc)
        return None

    def prune(self) -> list[Path]:
        by_step = {checkpoint_step(p): p for p in self.checkpoints()}
        _, pruned = keep_newest(list(by_step), self.keep)
        for step in pruned:
            shutil.rmtree(by_step[step], ignore_errors=True)
        for stale in self.root.glob("checkpoint-*.partial"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a crash mid-write; never loadable
        return [by_step[s] for s in pruned]
