"""Checkpoints: what one holds, how it is written (manifest last, fsync, then an atomic rename), how it
is verified and read back, the local store that keeps the newest N, and the lock that keeps one run
per output_dir.

A checkpoint is complete only when manifest.json is present, is well-formed (the schema below), agrees
with its folder's name, and every file it lists has the listed size and sha256. Anything else is
never loaded.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import struct
import logging
import os
import random
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol, Self

import numpy as np

from relay_train import json_text
from relay_train.safe_write import clean_temp, make_dir, open_new, remove_tree, write_atomic

if TYPE_CHECKING:
    import torch

# torch and safetensors are imported where tensors are read or written: `relay status` reads this
# module's names (the manifest, the retention rule) and should not pay seconds for torch

from relay_train.artifacts import (  # the names, defined once (ckpt.MANIFEST etc. still read)
    ADAPTER,
    ADAPTER_EMA,
    CONFIG,
    MANIFEST,
    OPTIMIZER,
    RNG,
    SCHEDULER,
    TRAINING_STATE,
    checkpoint_name,
    is_committed,
    step_of,
)

log = logging.getLogger(__name__)


REQUIRED = (ADAPTER, OPTIMIZER, SCHEDULER, RNG, TRAINING_STATE, CONFIG)  # ADAPTER_EMA only with use_ema
MANIFEST_FORMAT = 1
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, corrupt, or does not belong to this run."""


class CheckpointUnloadableError(CheckpointError):
    """A checkpoint whose files match their hashes, yet do not load (or do not fit the model): an older
    usable checkpoint is resumed instead, as for any other defect."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions); the earlier checkpoints are intact."""


class RunLockedError(RuntimeError):
    """Another process holds this output_dir."""


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
    import torch

    np_state = np.random.get_state()
    return {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "python": random.getstate(),
    }


def restore_rng(state: dict, generator: torch.Generator) -> None:
    import torch

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


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors file whose bytes depend only on the tensors and the metadata: the library writes its
    JSON header from a hash map (the metadata's order changes from one process to the next), so the header
    is rewritten with sorted keys, padded to 8 bytes as the format asks. Two identical runs export
    byte-identical adapters."""
    from safetensors.torch import save

    raw = save(tensors, metadata=metadata)
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + length :]


def save_adapters(
    adapter: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor] | None,
    metadata: dict[str, str],
    path: Path,
    ema_path: Path,
    dtype: torch.dtype | None = None,
) -> list[Path]:
    """The adapter (and its EMA twin, when kept) as LyCORIS-named safetensors; used by checkpoints (as they
    are: fp32, so a resume is exact) and by export (dtype bf16 where SimpleTuner writes bf16). Each file is
    written atomically (a killed export leaves only a temp file, removed at the next start)."""

    def cast(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return tensors if dtype is None else {k: v.to(dtype).contiguous() for k, v in tensors.items()}

    write_atomic(path, safetensors_bytes(cast(adapter), metadata))
    if ema is None:
        return [path]
    write_atomic(ema_path, safetensors_bytes(cast(ema), {**metadata, "ema": "true"}))
    return [path, ema_path]


def _torch_bytes(obj: object) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def write_checkpoint(folder: Path, payload: CheckpointPayload) -> None:
    """Write every file, then the manifest of their sizes and hashes, last. Nothing is written through a
    link (relay_train/safe_write.py)."""
    make_dir(folder)
    save_adapters(payload.adapter, payload.ema, payload.adapter_metadata, folder / ADAPTER, folder / ADAPTER_EMA)
    write_atomic(folder / OPTIMIZER, _torch_bytes(payload.optimizer))
    write_atomic(folder / SCHEDULER, _torch_bytes(payload.scheduler))
    write_atomic(folder / RNG, _torch_bytes(payload.rng))
    write_atomic(folder / TRAINING_STATE, json.dumps(payload.training_state, indent=2, sort_keys=True).encode())
    write_atomic(folder / CONFIG, payload.config_json.encode())
    files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(folder.iterdir()) if p.name != MANIFEST}
    manifest = {"format": MANIFEST_FORMAT, "step": payload.step, "files": files}
    write_atomic(folder / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
    # Durability: the data and the folder's entries reach the disk before the caller renames the folder,
    # so a power loss cannot leave a renamed checkpoint whose files are empty. One fsync per file
    # (8 files, every checkpointing_steps): milliseconds on a local SSD.
    for path in folder.iterdir():
        fsync_path(path)
    fsync_path(folder)


def fsync_path(path: Path) -> None:
    """fsync a file, or a folder (its entries: names created, renamed or removed in it)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def manifest_problems(manifest: object, folder_name: str | None = None) -> list[str]:
    """Schema of manifest.json, cross-checked with the folder's name ("checkpoint-N" must say step N).
    Pure: every problem found, empty when the manifest is well-formed."""
    if not isinstance(manifest, dict):
        return [f"the manifest is a JSON {type(manifest).__name__}, expected an object"]
    problems = []
    if manifest.get("format") != MANIFEST_FORMAT:
        problems.append(f"format {manifest.get('format')!r}: expected {MANIFEST_FORMAT}")
    step = manifest.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        problems.append(f"step {step!r}: expected a whole number >= 0")
    else:
        named = step_of(folder_name or "")
        if named is not None and named != step:
            problems.append(f"step {step} disagrees with the folder's name {folder_name!r}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        return problems + [f"files: expected an object of file name -> {{size, sha256}}, got {type(files).__name__}"]
    for name, entry in files.items():
        if not name or "/" in name or "\\" in name or name in (".", "..") or name == MANIFEST:
            problems.append(f"files: {name!r} is not a plain file name")
        elif not isinstance(entry, dict):
            problems.append(f"files[{name!r}]: expected {{size, sha256}}, got {type(entry).__name__}")
        else:
            size, sha = entry.get("size"), entry.get("sha256")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                problems.append(f"files[{name!r}].size {size!r}: expected a whole number >= 0")
            if not isinstance(sha, str) or not _SHA256.match(sha):
                problems.append(f"files[{name!r}].sha256 {sha!r}: expected 64 hex digits")
    missing = [name for name in REQUIRED if name not in files]
    if missing:
        problems.append(f"files: {', '.join(missing)} not listed")
    return problems


def verify_checkpoint(folder: Path, check_hashes: bool = True) -> dict:
    """The manifest, if the folder is a complete checkpoint; CheckpointError naming the defect otherwise."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{folder}: no {MANIFEST} (the write never finished)")
    try:
        manifest = json_text.loads(manifest_path.read_text())
    except (ValueError, OSError) as exc:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{folder}: unreadable {MANIFEST}: {exc}") from exc
    problems = manifest_problems(manifest, folder.name)
    if problems:
        raise CheckpointError(f"{folder}: malformed {MANIFEST}: {'; '.join(problems)}")
    for name, entry in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{folder}: {name} is listed in the manifest but missing")
        if path.stat().st_size != entry["size"]:
            raise CheckpointError(f"{folder}: {name} is {path.stat().st_size} bytes, manifest says {entry['size']}")
        if check_hashes and sha256_file(path) != entry["sha256"]:
            raise CheckpointError(f"{folder}: {name} does not match its sha256 in the manifest")
    return manifest


def read_checkpoint(folder: Path) -> CheckpointPayload:
    """Verify, then load. A file that matches its hash yet does not parse (or a training state that
    names another step) is a CheckpointError naming the file, never a raw loader error."""
    manifest = verify_checkpoint(folder)
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    def load(name: str, reader):
        try:
            return reader(folder / name)
        except Exception as exc:  # any loader failure means this file is unusable
            raise CheckpointUnloadableError(f"{folder}: {name} does not load: {type(exc).__name__}: {str(exc)[:200]}") from exc

    def adapter_metadata(path: Path) -> dict[str, str]:
        with safe_open(str(path), framework="pt") as fh:
            return fh.metadata() or {}

    def tensors(path: Path) -> dict:
        return torch.load(path, map_location="cpu", weights_only=True)

    training_state = load(TRAINING_STATE, lambda p: json_text.loads(p.read_text()))
    if not isinstance(training_state, dict) or training_state.get("step") != manifest["step"]:
        got = training_state.get("step") if isinstance(training_state, dict) else training_state
        raise CheckpointUnloadableError(f"{folder}: {TRAINING_STATE} says step {got!r}, the manifest step {manifest['step']}")
    return CheckpointPayload(
        step=manifest["step"],
        adapter=load(ADAPTER, lambda p: load_file(str(p))),
        adapter_metadata=load(ADAPTER, adapter_metadata),
        ema=load(ADAPTER_EMA, lambda p: load_file(str(p))) if ADAPTER_EMA in manifest["files"] else None,
        optimizer=load(OPTIMIZER, tensors),
        scheduler=load(SCHEDULER, tensors),
        rng=load(RNG, tensors),
        training_state=training_state,
        config_json=load(CONFIG, lambda p: p.read_text()),
    )


def checkpoint_step(folder: Path) -> int | None:
    return step_of(folder.name)


DEFAULT_KEEP = 5  # SimpleTuner's checkpoints_total_limit default, and the mission's "newest 5"


def keep_count(limit: int | None) -> int | None:
    """How many checkpoints every store keeps (output_dir, storage_path through Ray, the Hub): the config's
    checkpoints_total_limit; None (the config's null) keeps all, as the key's documentation says. The one
    retention number; every store asks here."""
    if limit is None:
        return None
    return limit if limit > 0 else DEFAULT_KEEP


def keep_newest(steps: list[int], keep: int | None) -> tuple[list[int], list[int]]:
    """Policy: (kept, pruned), newest first, when only the newest `keep` survive; None keeps all (a Ray
    worker's staging folder: Ray deletes each checkpoint there once uploaded). Stores that retain pass
    keep_count(checkpoints_total_limit)."""
    ordered = sorted(set(steps), reverse=True)
    if keep is None:
        return ordered, []
    return ordered[:keep], ordered[keep:]


class CheckpointIO(Protocol):
    """Where the trainer writes checkpoints. The orchestrator may wrap or replace it."""

    def save(self, payload: CheckpointPayload) -> Path: ...

    def latest(self) -> Path | None: ...


class LocalCheckpointStore:
    """`<root>/checkpoint-<step>/` folders; written under a `.partial` name and renamed when complete."""

    def __init__(self, root: Path, keep: int | None = None):
        self.root, self.keep = Path(root), keep

    def save(self, payload: CheckpointPayload) -> Path:
        final = self.root / checkpoint_name(payload.step)
        partial = self.root / f"{final.name}.partial"
        remove_tree(partial)  # a stale one (or a link at its name: removed, never followed)
        try:
            write_checkpoint(partial, payload)
        except BaseException as exc:  # a full disk, or an interrupt: never leave a half-written folder
            free = _free_bytes(self.root)
            remove_tree(partial)
            if isinstance(exc, Exception) and (is_disk_full(exc) or free < _MIN_FREE):
                raise CheckpointWriteError(
                    f"no space left to write {partial.name} in {self.root} ({_human(free)} free when it failed); "
                    "the partial folder was removed and the earlier checkpoints are intact: free some space, then "
                    "run the same command to resume"
                ) from exc
            raise
        if final.exists() or final.is_symlink():  # the same step saved again (an emergency save right after a scheduled one)
            remove_tree(final)
        partial.rename(final)  # atomic on one filesystem: readers see all of it or none
        fsync_path(self.root)  # the rename itself is durable
        self.prune()
        return final

    def checkpoints(self) -> list[Path]:
        """Complete-looking checkpoint folders (manifest present), newest first; hashes are checked on load."""
        found = [
            p
            for p in self.root.glob("checkpoint-*")
            if checkpoint_step(p) is not None and is_committed(lambda rel: (self.root / rel).is_file(), p.name)
        ]
        return sorted(found, key=checkpoint_step, reverse=True)

    def scan(self) -> list[tuple[Path, str | None]]:
        """Every `checkpoint-N` folder, newest first, with why it cannot be resumed (None: usable). Checks
        hashes until the first usable one; older ones are only listed."""
        folders = sorted(
            (p for p in self.root.glob("checkpoint-*") if checkpoint_step(p) is not None and p.is_dir()),
            key=checkpoint_step,
            reverse=True,
        )
        found: list[tuple[Path, str | None]] = []
        for folder in folders:
            if any(reason is None for _, reason in found):
                found.append((folder, None))
                continue
            try:
                verify_checkpoint(folder)
                found.append((folder, None))
            except CheckpointError as exc:
                found.append((folder, str(exc).removeprefix(f"{folder}: ")))
        return found

    def latest(self) -> Path | None:
        for folder, reason in self.scan():
            if reason is None:
                return folder
            log.warning("skipping checkpoint %s: %s", folder, reason)
        return None

    def prune(self) -> list[Path]:
        by_step = {checkpoint_step(p): p for p in self.checkpoints()}
        _, pruned = keep_newest(list(by_step), self.keep)
        for step in pruned:
            remove_tree(by_step[step])
        for stale in self.root.glob("checkpoint-*.partial"):
            remove_tree(stale)  # left by a crash mid-write; never loadable
        return [by_step[s] for s in pruned]


_MIN_FREE = 16 << 20  # a write that failed with less than this free is reported as a full disk


def _free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 1 << 62


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT anywhere in the chain, or the loaders' own words for it (torch's zip writer says only
    "file write failed"; safetensors says StorageFull)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(words in str(exc) for words in ("No space left", "StorageFull", "QuotaExceeded")):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _human(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


class RunLock:
    """An exclusive lock on one output_dir for the life of a run (fcntl.flock on `.relay-train.lock`).

    The kernel drops the lock when the process exits, however it exits (kill -9 included), so a crash
    never leaves a stale lock. The file holds the holder's pid and host for the refusal message.
    (flock over NFS is per host: it does not exclude a second run on another machine.)"""

    NAME = ".relay-train.lock"

    def __init__(self, folder: Path):
        self.folder, self.path = Path(folder), Path(folder) / self.NAME
        self._fh: IO[str] | None = None

    def acquire(self) -> Self:
        if self.folder.exists() and not self.folder.is_dir():
            raise RunLockedError(f"output_dir {self.folder} is a file, not a folder: point output_dir at a folder")
        self.folder.mkdir(parents=True, exist_ok=True)  # output_dir is the user's: it may be a link to a bigger disk
        # Never truncate before holding the lock (the holder's details live there); never through a link.
        fh = open_new(self.path, "r+", truncate=False)
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise RunLockedError(
                f"output_dir {self.folder} is in use by another run ({holder}); "
                "wait for it to finish, stop it, or choose another output_dir"
            ) from None
        fh.seek(0)
        fh.truncate()
        for stale in clean_temp(self.folder):  # the holder alone: what a killed export left
            log.info("removed %s, left by a write that was killed", stale)
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
