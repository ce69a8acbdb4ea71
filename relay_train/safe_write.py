"""Every local file and folder Relay creates goes through here, and none follows a symbolic link at its
final name: a lock, a `checkpoint-N.partial` folder, a manifest, an export, a cache entry or a report that
someone replaced with a link is refused (LinkRefusedError), never written through onto the link's target.

Folders above the final name are the user's to choose (an output_dir that is itself a link to a bigger
disk is fine); the last component is the tool's, so it is opened with O_NOFOLLOW or checked with lstat.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import uuid
from pathlib import Path
from typing import IO

TEMP_MARK = ".tmp-"  # in the name of a local file still being written; listings skip it, start-up removes it
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC


class LinkRefusedError(RuntimeError):
    """A name Relay writes is a symbolic link: writing would land on whatever the link points at."""

    def __init__(self, path: Path | str) -> None:
        super().__init__(
            f"{path} is a symbolic link; Relay never writes through a link at a name it owns "
            "(it would write onto the link's target): remove the link, then run the same command again"
        )
        self.path = Path(path)


def is_link(path: Path | str) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def open_new(path: Path | str, mode: str = "wb", *, exclusive: bool = False, truncate: bool = True) -> IO:
    """A file opened for writing without following a link at `path` (O_NOFOLLOW); LinkRefusedError if
    one is there. `exclusive` fails when the name exists (temp files); `truncate=False` keeps the content
    (a lock file whose holder's details must survive until the lock is held)."""
    flags = _NEW_FILE | (os.O_EXCL if exclusive else 0)
    if not truncate:
        flags = (flags & ~os.O_TRUNC & ~os.O_WRONLY) | os.O_RDWR
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP or (exc.errno == errno.EEXIST and is_link(path)):
            raise LinkRefusedError(path) from None
        raise
    return os.fdopen(fd, mode)


def write_file(path: Path | str, data: bytes) -> None:
    """Write a new file in a folder Relay made (a checkpoint's .partial folder); never through a link."""
    with open_new(path) as fh:
        fh.write(data)


def make_dir(path: Path | str, owned_below: Path | str | None = None) -> Path:
    """mkdir -p, refusing when the final name is a link (to a folder or anywhere else); with `owned_below`
    (a shared folder such as /tmp), every name between it and `path` is the tool's and is checked too."""
    path = Path(path)
    names = [path]
    if owned_below is not None:
        names += [p for p in path.parents if p.is_relative_to(owned_below) and p != Path(owned_below)]
    for name in reversed(names):
        if is_link(name):
            raise LinkRefusedError(name)
        name.mkdir(parents=True, exist_ok=True)
    return path


def remove_tree(path: Path | str) -> None:
    """Remove a folder Relay owns; a link at that name is removed itself, never what it points at."""
    path = Path(path)
    if is_link(path) or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def write_atomic(path: Path | str, data: bytes) -> None:
    """Replace a local file so that readers see the old content or the new, never a part of it. The temp
    file is created exclusively (never through a link); a link at `path` itself is refused."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # the user's folders (a folder Relay owns is made by make_dir)
    if is_link(path):
        raise LinkRefusedError(path)
    temp = path.with_name(f".{path.name}{TEMP_MARK}{uuid.uuid4().hex[:8]}")
    try:
        with open_new(temp, exclusive=True) as fh:
            fh.write(data)
        os.replace(temp, path)  # atomic on POSIX; replaces a name, never writes through one
    except BaseException as exc:
        temp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not exc.filename:  # a failed write() names no file: name what was written
            exc.filename = str(path)
        raise


def is_temp(name: str) -> bool:
    return name.startswith(".") and TEMP_MARK in name


def clean_temp(folder: Path | str) -> list[Path]:
    """Remove temp files a killed writer left directly in `folder` (call with the folder's lock held)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if is_temp(p.name) and (p.is_file() or is_link(p))]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
