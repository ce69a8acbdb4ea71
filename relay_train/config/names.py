"""Names that become parts of paths: a run's name (tracker_run_name, cluster.json's run_name, the output_dir's
folder name it defaults to, `relay status RUN`) names a folder in storage and the exported files. One rule,
checked by every command when it reads its config: a single path component, printable, so a name can never
climb out of storage_path, land in a subfolder the export did not make, or forge a log line.
"""

from __future__ import annotations

import unicodedata
from typing import Any

MAX_NAME_BYTES = 200  # a file name is 255 bytes on most filesystems; the export adds "sd35-" and "-lokr-ema.safetensors"


def _is_control(char: str) -> bool:
    return unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp")


def control_problem(text: str) -> str | None:
    """Why `text` cannot be used in a path or a message as it is (control characters), or None."""
    if any(_is_control(c) for c in text):
        return "holds a control character (a newline, tab or escape): remove it"
    return None


def path_part_problem(name: str) -> str | None:
    """Why `name` cannot be one folder or file name Relay creates, or None."""
    if not name.strip():
        return "is empty: name the run, e.g. 'terminus-relay-v2'"
    if "/" in name or "\\" in name:
        return "holds a '/' or '\\': a run name is one folder name, not a path; use '-' instead"
    if name in (".", "..") or name.startswith(".."):
        return "is '.', '..' or starts with '..': it would name a folder outside the run's storage; choose a plain name"
    if problem := control_problem(name):
        return problem
    if len(name.encode()) > MAX_NAME_BYTES:
        return f"is {len(name.encode())} bytes long: at most {MAX_NAME_BYTES}"
    return None


def check_path_part(name: str | None) -> str | None:
    """A pydantic validator: the name as is, or ValueError with the reason."""
    if name is not None and (problem := path_part_problem(name)):
        raise ValueError(problem)
    return name


def check_no_control(value: Any) -> Any:
    """A pydantic validator for paths the user names (output_dir): no control characters."""
    if isinstance(value, str) and (problem := control_problem(value)):
        raise ValueError(problem)
    return value
