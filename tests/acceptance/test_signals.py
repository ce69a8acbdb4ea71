"""Ctrl-C (SIGINT) and SIGTERM on `relay train`, `relay demo` and `relay launch`, as a person or a
scheduler sends them: a checkpoint is committed, the exit code is 128 + the signal (README), and the
same command resumes from that checkpoint."""

from __future__ import annotations

import json
import signal
import subprocess

import pytest
from support.lines import Lines  # tests/support/

pytestmark = pytest.mark.slow


def _send_when(proc: subprocess.Popen, pattern: str, sig: int, timeout: float = 600) -> str:
    """Read the process's output until `pattern` shows (training is under way; off a terminal the first
    progress line comes at the first report), then send `sig`; returns everything it printed up to its exit."""
    lines = Lines(proc.stdout)
    lines.wait_for(pattern, timeout)
    proc.send_signal(sig)
    proc.wait(timeout=300)
    return lines.text()


def _ledger(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_relay_train_stops_on_a_signal_with_a_checkpoint_and_resumes(fresh_clone, user_files, background, sig):
    config = json.loads(user_files.read_text())
    out = config["--output_dir"]
    proc = background(
        [fresh_clone.relay, "train", "--config", str(user_files), "--max_train_steps=600", "--checkpointing_steps=4000"],
        cwd=fresh_clone.root,
        env=fresh_clone.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    printed = _send_when(proc, r"step \d+", sig)
    assert proc.returncode == 128 + sig, printed[-3000:]
    assert "stopped at step" in printed and "Traceback" not in printed
    (folder,) = [p for p in __import__("pathlib").Path(out).glob("checkpoint-*") if not p.name.endswith(".partial")]
    stopped = int(folder.name.split("-")[1])
    again = fresh_clone.run(
        f".venv/bin/relay train --config {user_files} --max_train_steps={stopped + 2} --checkpointing_steps=4000", timeout=600
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"at step {stopped}" in again.stderr and "resumed" in again.stderr


def test_relay_demo_ctrl_c_commits_a_checkpoint_and_the_same_command_resumes(fresh_clone, background):
    common = ["--set", "output_dir=output/demo-ctrl-c"]  # its own run (named after output_dir) beside the demo's
    proc = background(
        [fresh_clone.relay, "demo", *common, "--set", "max_train_steps=3000"],
        cwd=fresh_clone.root,
        env=fresh_clone.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    printed = _send_when(proc, r"step \d+/3000", signal.SIGINT)
    assert proc.returncode == 130, printed[-4000:]
    assert "stop requested" in printed and "stopped at step" in printed and "Traceback" not in printed
    ledger = _ledger(fresh_clone.root / "output/ray/demo-ctrl-c/relay/ledger.jsonl")
    stopped = [e for e in ledger if e["type"] == "stopped"]
    assert stopped and stopped[-1]["signal"] == signal.SIGINT
    step = stopped[-1]["step"]
    assert (fresh_clone.root / f"output/ray/demo-ctrl-c/checkpoint-{step}/manifest.json").is_file()

    again = fresh_clone.run(
        f".venv/bin/relay demo --set output_dir=output/demo-ctrl-c --set max_train_steps={step + 10}", timeout=900
    )
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-4000:]
    assert f"resumed at step {step}" in out and f"completed at step {step + 10}" in out


def test_relay_launch_sigterm_commits_a_checkpoint(fresh_clone, user_files, background, tmp_path):
    cluster = tmp_path / "cluster.json"
    cluster.write_text(
        json.dumps(
            {
                "num_workers": 1,
                "cpus_per_worker": 1,
                "storage_path": str(tmp_path / "runs"),
                "run_name": "term",
                "preemption_check_steps": 5,
            }
        )
    )
    proc = background(
        [fresh_clone.relay, "launch", "--config", str(user_files), "--cluster", str(cluster), "--set", "max_train_steps=3000"],
        cwd=fresh_clone.root,
        env=fresh_clone.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    printed = _send_when(proc, r"step \d+/3000", signal.SIGTERM)
    assert proc.returncode == 143, printed[-4000:]
    ledger = _ledger(tmp_path / "runs/term/relay/ledger.jsonl")
    step = [e for e in ledger if e["type"] == "stopped"][-1]["step"]
    assert step % 5 == 0 and (tmp_path / f"runs/term/checkpoint-{step}/manifest.json").is_file()
    assert [e["type"] for e in ledger if e["type"] in ("stop_requested", "stopped")] == ["stop_requested", "stopped"]
