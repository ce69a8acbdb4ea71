"""SimpleTuner 4.10.1's wheel as a test corpus: fetched once with `pip download` into a cache folder and
read in place (a wheel is a zip). Nothing of it is installed or kept in this repository."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from functools import cache
from pathlib import Path

import pytest

VERSION = "4.10.1"
CACHE = Path(os.environ.get("RELAY_TEST_CACHE", Path.home() / ".cache" / "relay-test"))
EXAMPLES = "simpletuner/examples/"
REGISTRY = "simpletuner/simpletuner_sdk/server/services/field_registry/sections/"
SECTIONS = (
    "model",
    "training",
    "lora",
    "data",
    "validation",
    "advanced",
    "loss",
    "optimizer",
    "memory",
    "publishing",
    "logging_fields",
)  # the order its registry adds them in (sections/__init__.py)


@cache
def wheel_path() -> Path | None:
    """The cached wheel, downloading it the first time; None when it cannot be had (no network)."""
    found = sorted(CACHE.glob(f"simpletuner-{VERSION}-*.whl"))
    if found:
        return found[0]
    CACHE.mkdir(parents=True, exist_ok=True)
    # The wheel needs Python >= 3.12; --python-version lets any interpreter fetch it without installing.
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.12",
        f"simpletuner=={VERSION}",
        "-d",
        str(CACHE),
        "--quiet",
    ]
    try:
        subprocess.run(command, check=True, capture_output=True, timeout=300)
    except (subprocess.SubprocessError, OSError):
        return None
    found = sorted(CACHE.glob(f"simpletuner-{VERSION}-*.whl"))
    return found[0] if found else None


def wheel() -> zipfile.ZipFile:
    path = wheel_path()
    if path is None:
        pytest.skip(f"simpletuner=={VERSION} could not be downloaded (no network?); its examples are the corpus")
    return zipfile.ZipFile(path)


def example_files(suffix: str) -> dict[str, bytes]:
    """Every file under simpletuner/examples/ whose name ends with suffix: relative name -> bytes."""
    with wheel() as zf:
        return {n[len(EXAMPLES) :]: zf.read(n) for n in zf.namelist() if n.startswith(EXAMPLES) and n.endswith(suffix)}


def registry_defaults() -> dict[str, tuple[object, list[str]]]:
    """SimpleTuner's own options from its field registry source: name -> (default_value, aliases).
    Read with ast (literal values only), so nothing of SimpleTuner runs."""
    fields: dict[str, tuple[object, list[str]]] = {}
    with wheel() as zf:
        for section in SECTIONS:  # a later section's field replaces an earlier one of the same name, as there
            name = f"{REGISTRY}{section}.py"
            for node in ast.walk(ast.parse(zf.read(name))):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "ConfigField":
                    kwargs = {k.arg: k.value for k in node.keywords}
                    try:
                        key = ast.literal_eval(kwargs["name"])
                        default = ast.literal_eval(kwargs["default_value"]) if "default_value" in kwargs else None
                        aliases = ast.literal_eval(kwargs["aliases"]) if "aliases" in kwargs else []
                    except (KeyError, ValueError):
                        continue
                    fields[key] = (default, [a.removeprefix("--") for a in aliases or []])
    return fields


def registry_source() -> str:
    """The text of SimpleTuner's field registry: its sections and the model families' own fields."""
    folders = (REGISTRY, "simpletuner/helpers/models/field_registry/")
    with wheel() as zf:
        return "\n".join(zf.read(n).decode() for n in zf.namelist() if n.startswith(folders) and n.endswith(".py"))
