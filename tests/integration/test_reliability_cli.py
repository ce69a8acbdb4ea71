"""`relay train` under bad data, bad numbers and bad state, run as a person runs it: a process, its exit
code and its messages. Each class of failure gets its own instances; nothing here may end in a traceback,
and no run may end "successfully" with a broken adapter."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from relay_train import checkpoint as ckpt
from relay_train.data.caches import CORRUPT_REPORT
from relay_train.data.discovery import REPORT_NAME
from support.lines import Lines  # tests/support/

REPO = Path(__file__).resolve().parents[2]
RELAY = str(Path(sys.executable).with_name("relay"))
EXIT_USAGE, EXIT_NONFINITE, EXIT_LOCKED, EXIT_DISK_FULL, EXIT_INTERRUPTED = 2, 3, 4, 5, 130  # relay_train.exit_codes


def relay(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([RELAY, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def train(config: Path, *sets: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return relay("train", "--config", str(config), *(a for s in sets for a in ("--set", s)), timeout=timeout)


def no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def four_images(folder: Path, demo_data: Path) -> Path:
    """Four captioned demo images, one per aspect bucket: an epoch is 4 steps."""
    folder.mkdir()
    for i in range(4):
        for suffix in (".png", ".txt"):
            shutil.copy(demo_data / f"{i:04d}{suffix}", folder / f"{i:04d}{suffix}")
    return folder


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels in a few dozen bytes: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def build_caches(config_path: Path, tiny_model: Path):
    """Encode the latent and text caches in this process (what the first `relay train` would do)."""
    from relay_train.config import load_config
    from relay_train.data.plan import plan_dataset
    from relay_train.data.encode import build_missing

    config = load_config(config_path)
    build_missing(plan_dataset(config, tiny_model), tiny_model, torch.device("cpu"), torch.float32)
    return config


def latent_entries(out: Path) -> list[Path]:
    return sorted((out / "cache/vae/demo-images").glob("*.safetensors"))


# -- 1. bad images never end a run ---------------------------------------------------------------


def test_images_the_model_cannot_take_are_reported_and_the_run_completes(config_file, demo_data, tmp_path):
    data = four_images(tmp_path / "data", demo_data)
    Image.new("RGB", (1000, 10), "green").save(data / "panorama.png")  # 100:1, bucket 640x16 > the tiny model's 512
    (data / "bomb.png").write_bytes(png_header(30_000, 30_000))  # PIL raises DecompressionBombError
    (data / "huge.png").write_bytes(png_header(10_000, 10_000))  # over MAX_IMAGE_PIXELS: PIL only warns
    (data / "zero.png").write_bytes(b"")
    for name in ("panorama", "bomb", "huge", "zero"):
        (data / f"{name}.txt").write_text(f"a {name}")
    proc = train(config_file(data_dir=data), "max_train_steps=2", "checkpointing_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    no_traceback(proc)
    report = json.loads((tmp_path / "out/cache/vae/demo-images" / REPORT_NAME).read_text())
    reasons = {Path(f["file"]).name: f["reason"] for f in report["files"]}
    assert set(reasons) == {"panorama.png", "bomb.png", "huge.png", "zero.png"}
    assert reasons["panorama.png"].startswith("too big for the model: its bucket 640x16")
    assert "pos_embed_max_size 32 x patch_size 2 x VAE scale 8" in reasons["panorama.png"]
    assert reasons["bomb.png"].startswith("too many pixels") and reasons["huge.png"].startswith("too many pixels")
    assert report["by_reason"] == {"too big for the model": 1, "too many pixels": 2, "empty file": 1}
    assert (tmp_path / "out/checkpoint-2").is_dir() and "panorama.png" in proc.stderr


def test_a_corrupt_cache_entry_is_skipped_reported_and_rebuilt_next_start(config_file, demo_data, tiny_model, tmp_path):
    from relay_train.data.plan import plan_dataset

    path = config_file(data_dir=four_images(tmp_path / "data", demo_data), max_train_steps=4, checkpointing_steps=4)
    config = build_caches(path, tiny_model)
    bad = latent_entries(tmp_path / "out")[1]
    bad.write_bytes(bad.read_bytes()[:100])  # truncated: a raw SafetensorError if read unguarded
    proc = train(path)  # 4 steps: one epoch, so every sample is read
    assert proc.returncode == 0, proc.stderr[-3000:]
    no_traceback(proc)
    assert f"cache entry {bad} is corrupt" in proc.stderr and "encodes it again" in proc.stderr
    report = json.loads((bad.parent / CORRUPT_REPORT).read_text())
    assert [e["entry"] for e in report["entries"]] == [bad.name]
    assert not bad.exists()
    assert plan_dataset(config, tiny_model).missing_latents == [bad.name.removesuffix(".safetensors")]


# -- 2. non-finite training never ends in success ------------------------------------------------


def _poison(entries: list[Path]) -> None:
    for entry in entries:
        tensors = load_file(str(entry))
        save_file({k: torch.full_like(v, float("nan")) for k, v in tensors.items()}, str(entry))


def test_a_run_that_only_produces_nan_stops_non_zero_and_writes_nothing(config_file, demo_data, tiny_model, tmp_path):
    path = config_file(data_dir=four_images(tmp_path / "data", demo_data), max_train_steps=12, checkpointing_steps=4)
    build_caches(path, tiny_model)
    _poison(latent_entries(tmp_path / "out"))  # every sample NaN: every step's loss is NaN
    proc = train(path, "max_nonfinite_steps=3")
    assert proc.returncode == EXIT_NONFINITE, proc.stderr[-3000:]
    no_traceback(proc)
    assert "non-finite steps in a row (max_nonfinite_steps 3)" in proc.stderr
    assert not list((tmp_path / "out").glob("checkpoint-*")) and not list((tmp_path / "out").glob("sd35-*"))


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_or_stop_the_run_per_policy(config_file, demo_data, tiny_model, tmp_path):
    path = config_file(data_dir=four_images(tmp_path / "data", demo_data), max_train_steps=4, checkpointing_steps=4)
    build_caches(path, tiny_model)
    _poison(latent_entries(tmp_path / "out")[:1])  # one image of four: some steps are NaN
    stop = train(path, "nonfinite_policy=stop")
    assert stop.returncode == EXIT_NONFINITE and "nonfinite_policy is stop" in stop.stderr, stop.stderr[-3000:]
    no_traceback(stop)
    assert not list((tmp_path / "out").glob("checkpoint-*")) and not list((tmp_path / "out").glob("sd35-*"))

    skip = train(path)  # the default policy: skip and count
    assert skip.returncode == 0, skip.stderr[-3000:]
    assert "non-finite step(s) skipped" in skip.stderr
    exported = load_file(str(tmp_path / "out/sd35-out-lokr.safetensors"))
    assert all(torch.isfinite(t).all() for t in exported.values())
    assert json.loads((tmp_path / "out/checkpoint-4/training_state.json").read_text())["nonfinite_steps"] >= 1


# -- 3. checkpoint state that lies ----------------------------------------------------------------


def test_resume_classifies_config_changes_and_refuses_lying_checkpoints(make_config, config_file, tmp_path):
    from relay_train.trainer import build_trainer

    common = dict(max_train_steps=4, checkpointing_steps=2, learning_rate=1e-3, lr_warmup_steps=20)
    build_trainer(make_config(**common)).fit()  # checkpoint-2 and checkpoint-4
    path = config_file(**common)

    lycoris = json.loads((REPO / "configs/demo/lycoris_config.json").read_text())
    lycoris["apply_preset"]["module_algo_map"]["Attention"]["factor"] = 4  # other LoKr shapes
    (tmp_path / "lycoris.json").write_text(json.dumps(lycoris))
    changed = train(path, f"lycoris_config={tmp_path / 'lycoris.json'}")
    assert changed.returncode == EXIT_USAGE and "lycoris: " in changed.stderr
    assert "LyCORIS network's shape" in changed.stderr and "checkpoint-4" in changed.stderr
    no_traceback(changed)

    lowered = train(path, "max_train_steps=3")  # would export step 4 as "final"
    assert lowered.returncode == EXIT_USAGE and "already at step 4" in lowered.stderr
    no_traceback(lowered)

    raised = train(path, "max_train_steps=6", "learning_rate=0.005")
    assert raised.returncode == 0, raised.stderr[-3000:]
    assert "learning_rate: 0.001 -> 0.005: applied" in raised.stderr
    optimizer = torch.load(tmp_path / "out/checkpoint-6/optimizer.pt", weights_only=True)
    assert optimizer["param_groups"][0]["initial_lr"] == 0.005
    assert optimizer["param_groups"][0]["lr"] == pytest.approx(0.005 * 6 / 20)  # warmup at step 6
    assert json.loads((tmp_path / "out/checkpoint-6/config.json").read_text())["learning_rate"] == 0.005

    out = tmp_path / "out"
    (out / "checkpoint-2" / ckpt.MANIFEST).unlink()
    manifest = json.loads((out / "checkpoint-4" / ckpt.MANIFEST).read_text())
    (out / "checkpoint-4" / ckpt.MANIFEST).write_text(json.dumps({**manifest, "step": 6}))
    manifest = json.loads((out / "checkpoint-6" / ckpt.MANIFEST).read_text())
    manifest["files"][ckpt.OPTIMIZER] = "corrupt"
    (out / "checkpoint-6" / ckpt.MANIFEST).write_text(json.dumps(manifest))
    lying = train(path, "max_train_steps=8")
    assert lying.returncode == EXIT_USAGE, lying.stderr[-3000:]
    no_traceback(lying)
    for line in (
        "holds 3 checkpoint folder(s) and none can be resumed",
        "checkpoint-6: malformed manifest.json",
        "checkpoint-4: malformed manifest.json: step 6 disagrees with the folder's name",
        "checkpoint-2: no manifest.json",
        "resume_from_checkpoint=none",
    ):
        assert line in lying.stderr, line
    assert not (out / "checkpoint-8").exists()


# -- 6. one clear line where a traceback was -------------------------------------------------------


def test_validate_on_a_truncated_adapter_is_one_clear_line(config_file, tmp_path):
    adapter = tmp_path / "adapter.safetensors"
    save_file({"lycoris_x.lokr_w1": torch.randn(64, 64)}, str(adapter), metadata={"step": "3"})
    adapter.write_bytes(adapter.read_bytes()[:2000])
    proc = relay("validate", "--checkpoint", str(adapter), "--config", str(config_file()))
    assert proc.returncode == EXIT_USAGE and "not a readable adapter file (truncated or corrupt" in proc.stderr
    no_traceback(proc)


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_state(config_file, demo_data, small_disk, tmp_path):
    out = small_disk / "run"
    path = config_file(
        data_dir=four_images(tmp_path / "data", demo_data), output_dir=str(out), max_train_steps=2, checkpointing_steps=2
    )
    assert train(path).returncode == 0
    free = shutil.disk_usage(small_disk).free
    checkpoint_size = sum(f.stat().st_size for f in (out / "checkpoint-2").iterdir())
    (small_disk / "filler").write_bytes(b"\0" * max(0, free - checkpoint_size // 2))
    proc = train(path, "max_train_steps=4")
    assert proc.returncode == EXIT_DISK_FULL, proc.stderr[-3000:]
    no_traceback(proc)
    assert f"no space left to write checkpoint-4.partial in {out}" in proc.stderr and "free when it failed" in proc.stderr
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    ckpt.verify_checkpoint(out / "checkpoint-2")


# -- 7. one run per output_dir; Ctrl-C twice -------------------------------------------------------


def test_a_second_run_on_one_output_dir_is_refused_and_double_ctrl_c_keeps_state(config_file, tmp_path):
    path = config_file(max_train_steps=5000, checkpointing_steps=3)
    first = subprocess.Popen([RELAY, "train", "--config", str(path)], cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        lines = Lines(first.stderr)
        lines.wait_for("checkpoint-3 written", timeout=300)  # a checkpoint exists and the loop runs
        second = train(path)
        assert second.returncode == EXIT_LOCKED, second.stderr[-3000:]
        assert f"is in use by another run (pid {first.pid} on" in second.stderr
        no_traceback(second)

        first.send_signal(signal.SIGINT)
        time.sleep(0.05)
        first.send_signal(signal.SIGINT)
        first.wait(timeout=120)
        err = lines.text()
    finally:
        if first.poll() is None:
            first.kill()
    assert "Traceback" not in err, err[-3000:]
    assert first.returncode == EXIT_INTERRUPTED, err[-3000:]  # 128 + SIGINT either way
    if "stopped at step" not in err:  # the second arrived before the checkpoint began: nothing written
        assert "interrupted before a checkpoint was complete" in err, err[-3000:]
    out = tmp_path / "out"
    assert not list(out.glob("*.partial"))
    for folder in out.glob("checkpoint-*"):
        ckpt.verify_checkpoint(folder)


# -- crash consistency ---------------------------------------------------------------------------


def _kill_when(proc: subprocess.Popen, out: Path, mode: str, delay: float) -> str:
    """SIGKILL `proc` after `delay` s (mode 'time') or as soon as a checkpoint write is under way
    (mode 'partial'); returns what happened."""
    deadline = time.monotonic() + 300
    start = None
    while proc.poll() is None and time.monotonic() < deadline:
        if start is None and (out / ckpt.RunLock.NAME).exists():
            start = time.monotonic()  # the run holds its lock: start the clock
        if mode == "partial" and list(out.glob("checkpoint-*.partial")):
            proc.kill()
            return "killed inside a checkpoint write"
        if mode == "time" and start is not None and time.monotonic() - start > delay:
            proc.kill()
            return f"killed {delay:.1f}s in"
        time.sleep(0.002)
    return f"finished (rc {proc.returncode})"


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume_is_bitwise_an_uninterrupted_run(config_file, demo_data, tmp_path):
    import random

    from state_equal import assert_tree_equal  # tests/ is on sys.path (conftest rootdir)

    data = four_images(tmp_path / "data", demo_data)
    common = dict(
        data_dir=data, max_train_steps=10, checkpointing_steps=1, checkpoints_total_limit=3, gradient_checkpointing=False
    )
    straight = config_file(out="straight", **common)
    assert train(straight).returncode == 0
    chaos, out = config_file(out="chaos", **common), tmp_path / "chaos"
    rng = random.Random(int(os.environ.get("RELAY_CHAOS_SEED", "19")))
    events = []
    for mode in ("partial", "time", "partial", "time"):
        proc = subprocess.Popen(
            [RELAY, "train", "--config", str(chaos)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        events.append(_kill_when(proc, out, mode, rng.uniform(3.0, 15.0)))
        proc.wait(timeout=60)
    last = train(chaos)
    assert last.returncode == 0, last.stderr[-3000:]
    assert any("inside a checkpoint write" in e for e in events), events
    print("kill -9 chain:", events)

    a, b = tmp_path / "straight", out
    for name in ("sd35-straight-lokr.safetensors", "sd35-straight-lokr-ema.safetensors"):
        assert_tree_equal(load_file(str(a / name)), load_file(str(b / name.replace("straight", "chaos"))), name)
    for name in (ckpt.OPTIMIZER, ckpt.SCHEDULER):
        assert_tree_equal(
            torch.load(a / "checkpoint-10" / name, weights_only=True),
            torch.load(b / "checkpoint-10" / name, weights_only=True),
            name,
        )
    rng_a, rng_b = (torch.load(x / "checkpoint-10" / ckpt.RNG, weights_only=True) for x in (a, b))
    for name in ("generator", "torch"):  # numpy's and Python's start from OS entropy in each process; unused
        assert_tree_equal(rng_a[name], rng_b[name], f"rng.{name}")
    assert_tree_equal(
        load_file(str(a / "checkpoint-10" / ckpt.ADAPTER_EMA)), load_file(str(b / "checkpoint-10" / ckpt.ADAPTER_EMA)), "ema"
    )
