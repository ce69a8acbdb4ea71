"""Class: failures that escape the exit-code table. One map (relay_train/failures.py: known_failure) from
a failure to its documented code and a line; values that would overflow downstream are refused when the
config is read; JSON nested too deeply is a config problem, never a RecursionError."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from relay_train import checkpoint as ckpt
from relay_train.config import ConfigError, parse_config
from relay_train.exit_codes import Exit
from relay_train.failures import known_failure
from relay_train.json_text import TooDeepError, loads
from relay_train.safe_write import LinkRefusedError
from support.configs import raw_config

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "key, value",
    [
        ("--max_grad_norm", 1e308),
        ("--seed", 2**64),
        ("--seed", 2**63),
        ("--lr_warmup_steps", 10**30),
        ("--validation_guidance_skip_layers", [7, 2**70]),
        ("--validation_seed", -(2**64)),
        ("--minimum_image_size", 1e39),
    ],
)
def test_numbers_that_overflow_downstream_are_refused_at_config_time(tmp_path, key, value):
    with pytest.raises(ConfigError) as err:
        parse_config(raw_config(tmp_path, **{key: value}), tmp_path)
    assert key in str(err.value) and ("must fit" in str(err.value) or "finite" in str(err.value))


@pytest.mark.parametrize("text", ["[" * 5000 + "]" * 5000, '{"a":' * 3000 + "1" + "}" * 3000, "[" * 65 + "]" * 65])
def test_deep_json_is_a_value_error_never_a_recursion_error(text):
    with pytest.raises(TooDeepError):
        loads(text)
    assert loads("[" * 10 + "]" * 10) == [[[[[[[[[[]]]]]]]]]]


def test_a_deeply_nested_config_file_and_inline_webhook_are_config_problems(tmp_path):
    deep = "[" * 2000 + "]" * 2000
    (tmp_path / "c.json").write_text(deep)
    from relay_train.config import load_config

    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(tmp_path / "c.json")
    with pytest.raises(ConfigError, match="nested too deeply"):
        parse_config(raw_config(tmp_path, **{"--webhook_config": deep}), tmp_path)


def test_a_deeply_nested_manifest_is_a_skipped_checkpoint(tmp_path):
    folder = tmp_path / "checkpoint-5"
    folder.mkdir()
    (folder / ckpt.MANIFEST).write_text("[" * 5000 + "]" * 5000)
    with pytest.raises(ckpt.CheckpointError, match="unreadable"):
        ckpt.verify_checkpoint(folder)


@pytest.mark.parametrize(
    "exc, code, words",
    [
        (
            OSError(errno.ENOSPC, "No space left on device", "/out/.sd35-x-lokr.safetensors.tmp-1a2b3c4d"),
            Exit.DISK_FULL,
            "/out/sd35-x-lokr.safetensors",
        ),
        (OSError(errno.EDQUOT, "Disk quota exceeded", "/cache/vae/d/ab.pt"), Exit.DISK_FULL, "/cache/vae/d/ab.pt"),
        (
            PermissionError(errno.EACCES, "Permission denied", "/out/checkpoint-4.partial/optimizer.pt"),
            Exit.CONFIG,
            "permission denied",
        ),
        (OSError(errno.EROFS, "Read-only file system", "/out/checkpoint-4.partial"), Exit.CONFIG, "permission denied"),
        (LinkRefusedError("/out/.relay-train.lock"), Exit.CONFIG, "symbolic link"),
        (ckpt.RunLockedError("in use"), Exit.IN_USE, "in use"),
        (ValueError("data backend 'd': no usable images"), Exit.CONFIG, "no usable images"),
    ],
)
def test_each_known_failure_has_its_code_and_a_line(exc, code, words):
    known = known_failure(exc)
    assert known is not None and known.code == code and words in known.message
    assert ".tmp-" not in known.message


def test_a_wrapped_disk_full_is_still_disk_full():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/c/x")
        except OSError as inner:
            raise RuntimeError("encoder batch failed") from inner
    except RuntimeError as outer:
        assert known_failure(outer).code == Exit.DISK_FULL


def test_an_unexpected_error_keeps_its_traceback():
    assert known_failure(RuntimeError("a bug")) is None and known_failure(KeyError("k")) is None


SCRIPT = """
import json, sys
from relay_train.config.files import DataBackendConfig
from relay_train.data.discovery import discover
from relay_train.data.store import FileStore
from relay_train.failures import known_failure
data, cache = sys.argv[1], sys.argv[2]
backend = DataBackendConfig(id="d", type="local", instance_data_dir=data)
try:
    found = discover(backend, FileStore(data), FileStore(cache), minimum_size=0)
    print(json.dumps({"records": [r.key for r in found.records], "problems": found.problems}))
except Exception as exc:
    known = known_failure(exc)
    print(json.dumps({"code": int(known.code) if known else None, "message": known.message if known else repr(exc)}))
"""


@pytest.fixture
def as_nobody():
    """A folder nobody may use, and a runner for Python as that user (root reads everything)."""
    if os.geteuid() != 0 or subprocess.run(["setpriv", "--help"], capture_output=True).returncode:
        pytest.skip("needs root and setpriv to act as an unprivileged user")
    base = Path(tempfile.mkdtemp(prefix="relay-nobody-"))
    base.chmod(0o777)

    def run(*args: str) -> dict:
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", SCRIPT, *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    yield base, run
    subprocess.run(["chmod", "-R", "u+rwx", str(base)], check=False)
    subprocess.run(["rm", "-rf", str(base)], check=False)


def _png() -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (32, 32), "grey").save(out, format="PNG")
    return out.getvalue()


def test_an_unreadable_caption_skips_its_image_and_an_unreadable_folder_is_exit_2(as_nobody):
    base, run = as_nobody
    data, cache = base / "data", base / "cache"
    (data / "sub").mkdir(parents=True)
    for stem in ("ok", "secret"):
        (data / f"{stem}.png").write_bytes(_png())
        (data / f"{stem}.txt").write_text(f"a {stem} photo")
    (data / "secret.txt").chmod(0o000)
    for path in (data, data / "sub", base):
        path.chmod(0o777)
    for path in (data / "ok.png", data / "secret.png", data / "ok.txt"):
        path.chmod(0o644)
    got = run(str(data), str(cache))
    assert got["records"] == ["ok.png"]
    assert got["problems"][0][0] == "secret.png" and "caption could not be read" in got["problems"][0][1]
    (data / "sub").chmod(0o000)
    got = run(str(data), str(cache))
    assert got["code"] == Exit.CONFIG and "cannot be listed" in got["message"] and "sub" in got["message"]
