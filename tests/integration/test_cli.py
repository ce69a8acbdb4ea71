"""`relay` as a person runs it: clear errors, Ctrl-C keeps everything, the same command resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support.lines import Lines, stop

REPO = Path(__file__).resolve().parents[2]


def relay(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "relay_train.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=900, **kwargs
    )


def test_bad_config_lists_every_problem_without_a_traceback(tmp_path):
    raw = json.loads((REPO / "configs/demo/config.json").read_text())
    raw["--learning_rat"] = 1e-4
    raw["--train_batch_sise"] = 2
    raw["--grad_clip_method"] = "clamp"
    raw["--max_train_steps"] = "many"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(raw))
    proc = relay("train", "--config", str(bad))
    assert proc.returncode == 2
    err = proc.stderr
    assert "Traceback" not in err
    for fragment in (
        "--learning_rat",
        "--learning_rate",
        "--train_batch_sise",
        "--train_batch_size",
        "--grad_clip_method",
        "--max_train_steps",
    ):
        assert fragment in err, fragment


def test_missing_model_folder_is_a_clear_error(config_file, tmp_path):
    path = config_file(pretrained_model_name_or_path=str(tmp_path / "nowhere"))
    proc = relay("train", "--config", str(path))
    assert proc.returncode == 2 and "no model folder" in proc.stderr and "Traceback" not in proc.stderr


def test_sigint_checkpoints_and_the_same_command_resumes(config_file, tmp_path):
    path = config_file(max_train_steps=5000, checkpointing_steps=4000)
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay_train.cli", "train", "--config", str(path)], cwd=REPO, stderr=subprocess.PIPE, text=True
    )
    try:
        lines = Lines(proc.stderr)
        lines.wait_for(r"step \d+/5000", timeout=180)  # the loop runs: in a pipe, its first report is logged at once
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        stop(proc)
    err = lines.text()
    assert proc.returncode == 128 + signal.SIGINT, err  # stopped by the signal, its checkpoint written
    checkpoints = list((tmp_path / "out").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and "stopped at step" in err
    stopped_at = int(checkpoints[0].name.split("-")[1])
    assert 0 < stopped_at < 5000

    again = relay("train", "--config", str(path), "--set", f"max_train_steps={stopped_at + 3}")
    assert again.returncode == 0, again.stderr
    assert f"resumed from {checkpoints[0]} at step {stopped_at}" in again.stderr
    assert (tmp_path / "out" / f"checkpoint-{stopped_at + 3}").is_dir()


@pytest.mark.slow
def test_demo_config_trains_end_to_end(config_file, tmp_path):
    """The shipped demo recipe as is (300 steps, checkpoints every 50, limit 5), through the CLI."""
    proc = relay("train", "--config", str(config_file()), env={**os.environ, "COLUMNS": "120"})
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{s}" for s in (100, 150, 200, 250, 300)]
    assert (out / "sd35-out-lokr.safetensors").is_file() and (out / "sd35-out-lokr-ema.safetensors").is_file()
    assert "step 300/300" in proc.stderr and "it/s" in proc.stderr and "eta" in proc.stderr
