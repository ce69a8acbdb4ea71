"""The user's one command: `ray job submit --working-dir . -- python jobs/train.py ...` against a running
Ray head on loopback, exactly as on a cluster."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))
REPO = Path(__file__).resolve().parents[2]


def test_ray_job_submit_runs_and_a_resubmit_resumes(ray_head, config_file, tmp_path):
    address, env = ray_head
    config = config_file(max_train_steps=6, checkpointing_steps=3)  # absolute model/data paths
    cluster = tmp_path / "cluster.json"
    cluster.write_text(json.dumps({"num_workers": 1, "storage_path": str(tmp_path / "runs"), "run_name": "job"}))

    def submit(*extra: str) -> subprocess.CompletedProcess:
        # the entrypoint names this venv's python: CI runs it without activating the venv
        return subprocess.run(
            [
                RAY,
                "job",
                "submit",
                f"--address={address}",
                "--working-dir",
                ".",
                "--",
                sys.executable,
                "jobs/train.py",
                "--config",
                str(config),
                "--cluster",
                str(cluster),
                *extra,
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    first = submit()
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "succeeded" in first.stdout
    assert (tmp_path / "runs/job/checkpoint-6/manifest.json").is_file()

    again = submit("--set", "max_train_steps=9")
    assert again.returncode == 0, again.stdout[-3000:]
    assert "resumed at step 6" in again.stdout
    state = json.loads((tmp_path / "runs/job/checkpoint-9/training_state.json").read_text())
    assert state["resumed_at"] == [6]
