"""An error no restart can cure ends a Ray run at once, with relay train's exit code, instead of Ray's
failure policy retrying it: NaN/inf past nonfinite_policy (exit 3)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[2]
RELAY = str(Path(sys.executable).with_name("relay"))

pytestmark = pytest.mark.slow


def test_nan_past_the_policy_ends_a_launch_with_exit_3_and_no_retry(config_file, tiny_model, tmp_path):
    path = config_file(max_train_steps=30, checkpointing_steps=10, nonfinite_policy="stop", validation_steps=0)
    made = subprocess.run([RELAY, "precompute", "--config", str(path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stderr[-3000:]
    for entry in (tmp_path / "out/cache/vae").rglob("*.safetensors"):  # every sample NaN
        save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(str(entry)).items()}, str(entry))
    cluster = tmp_path / "cluster.json"
    cluster.write_text(
        json.dumps({"num_workers": 1, "storage_path": str(tmp_path / "runs"), "run_name": "nan", "max_failures": 5})
    )
    start = time.monotonic()
    got = subprocess.run(
        [RELAY, "launch", "--config", str(path), "--cluster", str(cluster)], cwd=REPO, capture_output=True, text=True, timeout=900
    )
    err = got.stderr
    assert got.returncode == 3, err[-4000:]
    assert "run stopped:" in err and "Traceback" not in err
    ledger = [json.loads(line) for line in (tmp_path / "runs/nan/relay/ledger.jsonl").read_text().splitlines()]
    assert len([e for e in ledger if e["type"] == "attempt"]) == 1  # Ray did not restart the group
    assert ledger[-1]["type"] == "failed" and not list((tmp_path / "runs/nan").glob("checkpoint-*"))
    print(f"NaN run ended in {time.monotonic() - start:.0f} s")
