"""Job-level autoresume: the supervisor submits jobs/train.py to a running head; the job's driver is
killed mid-run; the supervisor resubmits and the run resumes from storage by name."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from orchestrator.core.ledger import Ledger
from orchestrator.core.store import RunStorage
from orchestrator.ops.supervise import SuperviseOptions, supervise
from relay_train.exit_codes import Exit

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def _driver_of(config: Path) -> psutil.Process | None:
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if any(part.endswith("jobs/train.py") for part in cmd) and str(config) in cmd:
            return proc
    return None


def test_a_killed_driver_is_resubmitted_and_resumes(ray_head, config_file, tmp_path, monkeypatch):
    address, env = ray_head
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the loopback head runs without token auth
    config = config_file(max_train_steps=60, checkpointing_steps=5, validation_steps=0)
    cluster = tmp_path / "cluster.json"
    cluster.write_text(
        json.dumps({"num_workers": 1, "storage_path": str(tmp_path / "runs"), "run_name": "sup", "steward_poll_seconds": 0.5})
    )
    storage = RunStorage(str(tmp_path / "runs"), "sup")
    opts = SuperviseOptions(
        address=address,
        config=str(config),
        cluster=str(cluster),
        max_tries=3,
        backoff=0.5,
        poll=0.5,
        head_wait=30,
        working_dir=str(REPO),
        python=sys.executable,
    )
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(supervise(opts)), daemon=True)
    thread.start()

    deadline = time.monotonic() + 300
    while not storage.checkpoint_steps():  # the first job is training and has committed a checkpoint
        assert time.monotonic() < deadline and thread.is_alive(), "no checkpoint from the first job"
        time.sleep(0.5)
    driver = _driver_of(config)
    assert driver is not None, "the job's driver process was not found"
    os.kill(driver.pid, signal.SIGKILL)  # the driver dies mid-run, as with a lost head

    thread.join(timeout=600)
    assert outcome == [Exit.OK]
    attempts = [e for e in Ledger(storage).events if e["type"] == "attempt"]
    resumed = [a for a in attempts if a["reason"] == "head_lost"]  # the killed driver recorded no end
    assert resumed and resumed[-1]["step"] >= 5  # from storage, not from step 0
    state = json.loads((tmp_path / "runs/sup/checkpoint-60/training_state.json").read_text())
    assert state["step"] == 60 and state["resumed_at"]


def test_a_config_error_is_not_retried(ray_head, config_file, tmp_path, monkeypatch):
    address, _ = ray_head
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    opts = SuperviseOptions(
        address=address,
        config=str(config_file()),
        sets=("max_train_stepz=3",),
        max_tries=5,
        backoff=0.1,
        poll=0.5,
        head_wait=30,
        working_dir=str(REPO),
        python=sys.executable,
    )
    start = time.monotonic()
    assert supervise(opts) == Exit.CONFIG
    print(f"config error recognised in {time.monotonic() - start:.1f} s, one submission")
