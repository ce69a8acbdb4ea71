"""Which exit code (relay_train/exit_codes.py) a failure that reaches a command's entry point gets, and the
line the user reads instead of a traceback. One function for every entry point (relay train, launch,
status, precompute, validate, jobs/): a known class of failure is a clear message and its documented code;
anything else is a bug, and keeps its traceback (exit 1).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from relay_train.exit_codes import Exit, for_error

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NO_ACCESS = (errno.EACCES, errno.EPERM, errno.EROFS)


@dataclass(frozen=True)
class Known:
    code: Exit
    message: str


def _chain(exc: BaseException, limit: int = 8) -> list[BaseException]:
    found: list[BaseException] = []
    while exc is not None and len(found) < limit:
        found.append(exc)
        exc = exc.__cause__ or exc.__context__
    return found


def _place(exc: OSError) -> str:
    from relay_train.safe_write import TEMP_MARK

    name = str(exc.filename or "")
    if TEMP_MARK in name:  # the temp file of an atomic write: name what was being written
        head, _, tail = name.rpartition("/")
        name = f"{head}/{tail.lstrip('.').split(TEMP_MARK)[0]}" if head else tail.lstrip(".").split(TEMP_MARK)[0]
    return name or "a file"


def known_failure(exc: BaseException) -> Known | None:
    """The exit code and message for a known class of failure; None for an unexpected error. The permanent
    classes and their codes are exit_codes.for_error's (the same ones Ray never retries); an entry point
    also knows the failures of the machine it runs on (disk full, permission denied) and a usage error."""
    from relay_train.checkpoint import is_disk_full
    from relay_train.config import ConfigError

    code = for_error(exc)
    if code is not None:
        if isinstance(exc, ConfigError):
            return Known(code, f"invalid config:\n{exc}")
        return Known(code, f"training stopped: {exc}" if code == Exit.NONFINITE else str(exc))
    if is_disk_full(exc):  # while caching latents, writing a report, exporting the adapter
        where = next((_place(e) for e in _chain(exc) if isinstance(e, OSError) and e.filename), "a file")
        return Known(
            Exit.DISK_FULL,
            f"no space left on the device while writing {where}; nothing half-written was kept and the earlier "
            "checkpoints are intact: free some space, then run the same command to resume",
        )
    if isinstance(exc, (FileNotFoundError, NotImplementedError, ValueError)):  # a usage problem past the config's checks
        return Known(Exit.CONFIG, str(exc))
    denied = next((e for e in _chain(exc) if isinstance(e, OSError) and e.errno in _NO_ACCESS), None)
    if denied is not None:
        return Known(
            Exit.CONFIG,
            f"permission denied writing or reading {_place(denied)} ({denied.strerror}): fix its permissions, "
            "or point output_dir (or the data folder) somewhere this user may write; earlier checkpoints are intact",
        )
    return None
