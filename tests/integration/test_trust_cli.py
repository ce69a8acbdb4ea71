"""Trust boundaries tried from the command line, as a hostile or careless user would: each class with
several instances, each a process with its exit code and its messages, never a traceback."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RELAY = str(Path(sys.executable).with_name("relay"))


def relay(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([RELAY, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def refused(proc: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for word in words:
        assert word in proc.stderr, proc.stderr[-3000:]


# -- user strings as path parts ---------------------------------------------------------------------------


@pytest.mark.parametrize("run", ["../x", "a/b", "..", "x\ny"])
def test_relay_status_reads_only_inside_the_storage(tmp_path, run):
    (tmp_path / "x" / "relay").mkdir(parents=True)  # a run beside the storage, where ../x would lead
    storage = tmp_path / "storage"
    storage.mkdir()
    refused(relay("status", run, "--storage", str(storage)), 2, "run name")


@pytest.mark.parametrize("name", ["a/b", "../up"])
def test_relay_train_refuses_a_run_name_with_a_path_before_any_work(config_file, tmp_path, name):
    proc = relay("train", "--config", str(config_file()), "--set", f"tracker_run_name={name}")
    refused(proc, 2, "tracker_run_name")
    assert not (tmp_path / "out").exists()  # nothing trained, nothing to lose at the export


@pytest.mark.parametrize("name", ["../NAME", "a/b"])
def test_relay_launch_refuses_a_run_name_that_leaves_storage_path(config_file, tmp_path, name):
    storage = tmp_path / "ray"
    proc = relay(
        "launch", "--config", str(config_file()), "--cluster-set", f"run_name={name}", "--cluster-set", f"storage_path={storage}"
    )
    refused(proc, 2, "run_name")
    assert not (tmp_path / "NAME").exists() and not storage.exists()


# -- failures that escape the exit-code table -----------------------------------------------------------


@pytest.mark.parametrize(
    "setting, key",
    [
        ("max_grad_norm=1e308", "max_grad_norm"),
        ("seed=18446744073709551616", "seed"),  # 2^64
        ("lr_warmup_steps=1e30", "lr_warmup_steps"),
        ("webhook_config=" + "[" * 3000 + "]" * 3000, "webhook_config"),
    ],
)
def test_values_that_would_overflow_later_are_refused_before_any_work(config_file, tmp_path, setting, key):
    proc = relay("train", "--config", str(config_file()), "--set", setting)
    refused(proc, 2, key)
    assert not (tmp_path / "out").exists()


def test_a_deeply_nested_config_file_is_exit_2(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"--seed": ' + "[" * 5000 + "]" * 5000 + "}")
    refused(relay("train", "--config", str(path)), 2, "nested too deeply")


@pytest.mark.parametrize("command", ["train", "precompute"])
def test_a_full_disk_while_caching_is_exit_5(config_file, small_disk, command):
    out = small_disk / "run"
    path = config_file(output_dir=str(out))
    out.mkdir()
    (small_disk / "filler").write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 4096))  # room for the lock alone
    proc = relay(command, "--config", str(path))
    refused(proc, 5, "no space left on the device while writing", str(out / "cache"))
    assert not list(out.rglob("*.tmp-*"))


def test_permission_denied_on_a_checkpoint_write_is_exit_2_and_keeps_the_earlier_one(config_file, tmp_path):
    from relay_train import checkpoint as ckpt

    out = tmp_path / "run"
    path = config_file(output_dir=str(out), max_train_steps=2, checkpointing_steps=2)
    assert relay("train", "--config", str(path)).returncode == 0
    partial = out / "checkpoint-4.partial"
    partial.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(partial)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        proc = relay("train", "--config", str(path), "--set", "max_train_steps=4")
    finally:
        subprocess.run(["umount", "-l", str(partial)], check=False)
    refused(proc, 2, "permission denied", "checkpoint-4.partial")
    ckpt.verify_checkpoint(out / "checkpoint-2")


# -- a hash-valid but unloadable newest checkpoint ---------------------------------------------------------


def _lie(folder: Path, name: str, data: bytes) -> None:
    """Replace a checkpoint file and make its manifest vouch for the new bytes: every hash still matches."""
    import hashlib
    import json

    from relay_train import checkpoint as ckpt

    (folder / name).write_bytes(data)
    manifest = json.loads((folder / ckpt.MANIFEST).read_text())
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / ckpt.MANIFEST).write_text(json.dumps(manifest))


def test_a_hash_valid_but_unloadable_newest_checkpoint_falls_back_to_the_older_one(config_file, tmp_path):
    import torch
    from safetensors.torch import save

    from relay_train import checkpoint as ckpt

    out = tmp_path / "run"
    path = config_file(output_dir=str(out), max_train_steps=2, checkpointing_steps=1)
    assert relay("train", "--config", str(path)).returncode == 0
    lies = [
        (ckpt.OPTIMIZER, b"not a torch file at all"),  # does not parse
        (ckpt.ADAPTER, save({"lycoris_nothing_here.lokr_w1": torch.zeros(3)})),  # parses, fits no network
        (ckpt.TRAINING_STATE, b'{"step": 999}'),  # parses, names another step
    ]
    for steps, (name, data) in enumerate(lies, start=3):
        newest = out / f"checkpoint-{steps - 1}"
        _lie(newest, name, data)
        ckpt.verify_checkpoint(newest)  # every hash matches
        proc = relay("train", "--config", str(path), "--set", f"max_train_steps={steps}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"skipping checkpoint {newest}" in proc.stderr and f"resumed from {out}/checkpoint-{steps - 2}" in proc.stderr
        ckpt.verify_checkpoint(out / f"checkpoint-{steps}")


# -- one output_dir, two runs ---------------------------------------------------------------------------


@pytest.fixture
def held_output_dir(tmp_path):
    """Another process holding `tmp_path/run`'s output_dir lock, as a running `relay train` does."""
    from relay_train import checkpoint as ckpt

    out = tmp_path / "run"
    out.mkdir()
    script = (
        "import sys, time; from relay_train.checkpoint import RunLock; lock = RunLock(sys.argv[1]).acquire(); "
        "print('held', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen([sys.executable, "-c", script, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield out, holder.pid
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert (out / ckpt.RunLock.NAME).exists()


def test_relay_launch_takes_the_output_dir_lock_too(config_file, held_output_dir, tmp_path):
    out, pid = held_output_dir
    proc = relay("launch", "--config", str(config_file(output_dir=str(out))), "--cluster-set", f"storage_path={tmp_path / 'ray'}")
    refused(proc, 4, f"output_dir {out} is in use by another run (pid {pid} on")
    assert not list(out.glob("checkpoint-*")) and not list(out.glob("*.safetensors"))


def test_every_command_that_writes_a_run_holds_the_same_lock(make_config, held_output_dir):
    from orchestrator.run.launch import hold_output_lock
    from orchestrator.run.resources import RunInUseError

    out, pid = held_output_dir
    with pytest.raises(RunInUseError, match=f"pid {pid}"):
        hold_output_lock(make_config(output_dir=str(out)))


# -- reproducible artifacts -----------------------------------------------------------------------------


def test_two_identical_runs_export_byte_identical_adapters(config_file, tmp_path):
    exports = []
    for name in ("first", "second"):
        out = tmp_path / name
        path = config_file(output_dir=str(out), max_train_steps=2, tracker_run_name="same", use_ema=True)
        proc = relay("train", "--config", str(path))
        assert proc.returncode == 0, proc.stderr[-3000:]
        exports.append({p.name: p.read_bytes() for p in sorted(out.glob("sd35-same-lokr*.safetensors"))})
    assert sorted(exports[0]) == ["sd35-same-lokr-ema.safetensors", "sd35-same-lokr.safetensors"]
    assert exports[0] == exports[1]
