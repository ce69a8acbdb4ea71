"""File discovery for one image backend: which images train, with what caption and size.

Every image is read and fully decoded once, so corrupt, truncated and zero-byte files, and images
over the decoder's pixel limit, are caught here, not in the middle of training (any exception at the
per-image boundary is a reason, never the end of the run). What was learnt (content hash, size, caption, or why the file
is unusable) goes into `index.json` in the backend's VAE cache folder, keyed by each file's stamp
(mtime+size locally, ETag on S3): a later run with unchanged files lists the folder and reads
nothing else. Bad files are skipped, counted and listed in `problematic_images.json` beside it.
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from PIL import Image, UnidentifiedImageError

from relay_train import json_text
from relay_train.data.caches import digest
from relay_train.data.decode import CaptionError, decode_caption, decode_image
from relay_train.config.files import DataBackendConfig
from relay_train.data.store import FileInfo, FileStore

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
INDEX_NAME, REPORT_NAME = "index.json", "problematic_images.json"
UNREADABLE = ("empty file", "unreadable")  # the reasons --delete_problematic_images acts on
INDEX_VERSION = 2  # 2: sizes are upright (EXIF orientation applied)


@dataclass(frozen=True)
class ImageRecord:
    backend_id: str
    key: str  # relative to the backend's image store
    caption: str
    size: tuple[int, int]  # (width, height) as stored
    digest: str  # sha256 of the image bytes


@dataclass
class Discovery:
    records: list[ImageRecord]
    problems: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)
    files_read: int = 0  # images downloaded and decoded this time (0 on a warm start)
    empty_captions: list[str] = field(default_factory=list)  # trained, as the empty prompt: counted and reported


def inspect_image(data: bytes, max_pixels: int | None = None) -> tuple[tuple[int, int] | None, str | None]:
    """(size, None) for a usable image, (None, reason) otherwise. Decodes fully, through the decoder that
    training uses (relay_train/data/decode.py), so the size is the upright one (EXIF orientation applied).
    Images over `max_pixels` (default: Pillow's MAX_IMAGE_PIXELS, its guard against decompression bombs)
    are rejected from the header, before any pixel is decoded."""
    if not data:
        return None, "empty file"
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
        if limit and width * height > limit:
            return None, _too_many_pixels(width, height, limit)
        return decode_image(data, max_pixels=limit).size, None
    except Image.DecompressionBombError as exc:
        return None, f"too many pixels ({str(exc)[:120]})"
    except Exception as exc:  # noqa: BLE001 - any decoder failure is this file's problem, never the run's
        if isinstance(exc, UnidentifiedImageError):
            return None, "unreadable (not an image Pillow can identify)"
        return None, f"unreadable ({exc.__class__.__name__}: {str(exc)[:80]})"


def _too_many_pixels(width: int, height: int, limit: int) -> str:
    return (
        f"too many pixels ({width}x{height} = {width * height:,}, over the decoder's limit of {limit:,}: "
        "Pillow's MAX_IMAGE_PIXELS, a guard against decompression bombs)"
    )


def _probe(store: FileStore, info: FileInfo) -> dict[str, Any]:
    try:
        data = store.read(info.key)
    except Exception as exc:  # noqa: BLE001 - a file that cannot be read is skipped, and probed again next start
        return {"stamp": None, "error": f"could not be read ({exc.__class__.__name__}: {str(exc)[:80]})"}
    size, error = inspect_image(data)
    entry: dict[str, Any] = {"stamp": info.stamp, "digest": digest(data)}
    return entry | ({"error": error} if error else {"size": list(size)})


class CaptionSource:
    """Captions per caption_strategy: textfile, filename, instanceprompt or parquet."""

    def __init__(self, backend: DataBackendConfig, store: FileStore, listing: dict[str, FileInfo]) -> None:
        self.backend, self.store, self.listing = backend, store, listing
        self._parquet: dict[str, str] | None = None

    def caption(self, key: str, index: dict[str, Any]) -> str | None:
        """The image's caption; None when it has none; CaptionError when its file cannot be read as text."""
        strategy = self.backend.caption_strategy
        if strategy == "filename":
            return PurePosixPath(key).stem.replace("_", " ").strip()
        if strategy == "instanceprompt":
            return self.backend.instance_prompt or ""
        if strategy == "parquet":
            return self._from_parquet(key)
        text_key = str(PurePosixPath(key).with_suffix(".txt"))
        info = self.listing.get(text_key)
        if info is None:
            return None
        cached = index.get(text_key)
        if cached and cached.get("stamp") == info.stamp:
            return cached["caption"]
        try:
            data = self.store.read(text_key)
        except OSError as exc:  # permissions, or gone since the listing: this image's problem, not the run's
            raise CaptionError(f"caption could not be read ({exc.__class__.__name__}: {str(exc)[:80]})") from None
        caption = decode_caption(data)
        index[text_key] = {"stamp": info.stamp, "caption": caption}
        return caption

    def _from_parquet(self, key: str) -> str | None:
        if self._parquet is None:
            self._parquet = _read_parquet_captions(self.backend, self.store)
        name = key if (self.backend.parquet or {}).get("identifier_includes_extension") else PurePosixPath(key).stem
        return self._parquet.get(name) or self._parquet.get(key)


def _read_parquet_captions(backend: DataBackendConfig, store: FileStore) -> dict[str, str]:
    """SimpleTuner's parquet settings: path (in the backend's store), filename_column, caption_column,
    fallback_caption_column."""
    import pyarrow.parquet as pq

    settings = backend.parquet or {}
    if "path" not in settings:
        raise ValueError(f"data backend {backend.id!r}: caption_strategy parquet needs parquet.path")
    table = pq.read_table(io.BytesIO(store.read(settings["path"])))
    names = table.column(settings.get("filename_column", "filename")).to_pylist()
    captions = table.column(settings.get("caption_column", "caption")).to_pylist()
    fallback_column = settings.get("fallback_caption_column")
    fallback = table.column(fallback_column).to_pylist() if fallback_column else [None] * len(names)
    return {str(n): str(c or f or "").strip() for n, c, f in zip(names, captions, fallback) if (c or f)}


def load_index(cache: FileStore) -> dict[str, Any]:
    try:
        data = json_text.loads(cache.read(INDEX_NAME))
    except (FileNotFoundError, ValueError):  # absent, or half-written by an old crash: rebuild it
        return {}
    return data.get("files", {}) if data.get("version") == INDEX_VERSION else {}


def discover(
    backend: DataBackendConfig,
    store: FileStore,
    cache: FileStore,
    minimum_size: float,
    trust_index: bool = False,
    threads: int = 16,
) -> Discovery:
    """Every usable image of one backend, plus (key, reason) for each one skipped.

    trust_index (skip_file_discovery 'metadata'/'aspect'): use the saved index without listing.
    """
    index = load_index(cache)
    if trust_index and index:
        listing = {k: FileInfo(k, 0, v["stamp"]) for k, v in index.items()}
    else:
        listing = {info.key: info for info in store.list()}
    images = [info for key, info in sorted(listing.items()) if PurePosixPath(key).suffix.lower() in IMAGE_SUFFIXES]
    stale = [info for info in images if index.get(info.key, {}).get("stamp") != info.stamp or "digest" not in index[info.key]]
    # I/O-bound (S3 GETs) and PIL releases the GIL while decoding: threads overlap both.
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for info, entry in zip(stale, pool.map(lambda i: _probe(store, i), stale)):
            index[info.key] = entry
    captions = CaptionSource(backend, store, listing)
    result = Discovery(records=[], files_read=len(stale))
    for info in images:
        entry = index[info.key]
        reason = entry.get("error") or _size_problem(entry["size"], minimum_size)
        try:
            caption = None if reason else captions.caption(info.key, index)
        except CaptionError as exc:
            caption, reason = None, str(exc)
        if not reason and caption is None:
            reason = f"no caption (caption_strategy {backend.caption_strategy})"
        if reason:
            result.problems.append((info.key, reason))
            continue
        if not caption:
            result.empty_captions.append(info.key)
        record = ImageRecord(backend.id, info.key, caption, tuple(entry["size"]), entry["digest"])
        result.records.extend([record] * (1 + backend.repeats))
    live = set(listing)
    files = {k: v for k, v in index.items() if k in live}
    cache.write(INDEX_NAME, json.dumps({"version": INDEX_VERSION, "files": files}, sort_keys=True).encode())
    return result


def _size_problem(size: list[int], minimum: float) -> str | None:
    if minimum and min(size) < minimum:
        return f"{size[0]}x{size[1]} is under minimum_image_size {minimum:g}"
    return None


def problem_kind(reason: str) -> str:
    kinds = ("empty file", "unreadable", "no caption", "caption", "too many pixels", "too big for the model", "could not be read")
    for kind in kinds:
        if reason.startswith(kind):
            return kind
    return "too small"


def report_problems(
    backend: DataBackendConfig,
    store: FileStore,
    cache: FileStore,
    problems: list[tuple[str, str]],
    delete: bool,
    empty_captions: list[str] | None = None,
) -> list[str]:
    """Write the report into the cache folder, log a summary, delete unreadable files when asked
    (local backends only: an S3 dataset is never modified; locally only files whose real path is inside
    the data folder). Empty captions train (as the empty prompt) and are counted in the report. Returns
    what was deleted."""
    empty_captions = empty_captions or []
    deleted: list[str] = []
    if delete and problems and not store.is_local:
        log.warning(
            "data backend %r: --delete_problematic_images leaves S3 objects alone; %d bad file(s) are only skipped",
            backend.id,
            len(problems),
        )
    elif delete:
        for key, reason in problems:
            if reason.startswith(UNREADABLE):
                try:
                    store.delete(key)
                except OSError as exc:  # outside the data folder (a link), or not ours to delete
                    log.warning("data backend %r: %s", backend.id, exc)
                    continue
                deleted.append(store.describe(key))
        if deleted:
            log.warning("data backend %r: deleted %d problematic image(s): %s", backend.id, len(deleted), ", ".join(deleted))
    counts = Counter(problem_kind(reason) for _, reason in problems)
    report = {
        "backend": backend.id,
        "count": len(problems),
        "by_reason": dict(counts),
        "files": [{"file": store.describe(k), "reason": r, "deleted": store.describe(k) in deleted} for k, r in problems],
        "empty_captions": {"count": len(empty_captions), "files": [store.describe(k) for k in empty_captions]},
    }
    cache.write(REPORT_NAME, json.dumps(report, indent=2).encode())
    if problems:
        shown = "; ".join(f"{k}: {r}" for k, r in problems[:10])
        log.warning(
            "data backend %r: skipped %d image(s) (report: %s): %s", backend.id, len(problems), cache.describe(REPORT_NAME), shown
        )
    if empty_captions:
        log.warning(
            "data backend %r: %d image(s) have an empty caption and train as the empty prompt (report: %s): %s",
            backend.id,
            len(empty_captions),
            cache.describe(REPORT_NAME),
            ", ".join(empty_captions[:10]),
        )
    return deleted
