"""`relay train` as a SimpleTuner user runs it: config keys as flags, and every config problem at start,
all at once, exit code 2, no traceback and no secret."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[2]
RELAY = Path(sys.executable).with_name("relay")
TOKEN = "s3cr3t-t0ken-do-not-leak"
SECRET_URL = f"https://discord.com/api/webhooks/123456/{TOKEN}"


def relay(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(RELAY), *args], cwd=REPO, capture_output=True, text=True, timeout=600)


def assert_config_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "invalid config" in proc.stderr
    return proc.stderr


def test_every_problem_at_once_from_file_flags_and_lycoris_file(config_file, tmp_path):
    lycoris = json.loads((REPO / "configs/demo/lycoris_config.json").read_text())
    lycoris["full_matirx"] = lycoris.pop("full_matrix")
    lycoris["apply_preset"]["target_modules"] = lycoris["apply_preset"].pop("target_module")
    (tmp_path / "lyco.json").write_text(json.dumps(lycoris))
    path = config_file(
        learning_rate=float("inf"),
        flow_schedule_shift=1e30,
        lycoris_config=str(tmp_path / "lyco.json"),
        webhook_config=json.dumps({"webhook_url": SECRET_URL, "webhook_type": "discord", "x": 1}),
    )
    err = assert_config_error(
        relay(
            "train",
            "--config",
            str(path),
            "--init_lora",
            "missing.safetensors",
            "--learning_rat=1e-4",
            "--ema_device",
            "cpu",
            "--lora_type=standard",
        )
    )
    for fragment in (
        "'--learning_rate': got inf",
        "'--flow_schedule_shift': got 1e+30",
        "unknown key 'full_matirx': did you mean 'full_matrix'?",
        "apply_preset: unknown key 'target_modules': did you mean 'target_module'?",
        "webhook_config: unknown key 'x'",
        "'--init_lora': file 'missing.safetensors' not found",
        "unknown key '--learning_rat': did you mean '--learning_rate'?",
        "SimpleTuner option '--ema_device' is not supported by Terminus Relay",
        "SimpleTuner option '--lora_type'='standard' is not supported by Terminus Relay",
    ):
        assert fragment in err, fragment
    assert TOKEN not in err and "123456" not in err
    assert not (tmp_path / "cache").exists()  # refused before any data work


def test_unusable_output_dir_and_unreadable_file(config_file, tmp_path):
    (tmp_path / "taken").write_text("a file")
    err = assert_config_error(relay("train", "--config", str(config_file(out="x")), "--output_dir", str(tmp_path / "taken")))
    assert "'--output_dir': got" in err and "is a file, not a folder" in err
    err = assert_config_error(relay("train", "--config", str(config_file(out="y")), "--output_dir="))
    assert "is empty" in err
    latin = tmp_path / "latin1.json"
    latin.write_bytes('{"--validation_prompt": "caf\u00e9"}'.encode("latin-1"))
    err = assert_config_error(relay("train", "--config", str(latin)))
    assert f"{latin}: is not UTF-8 text" in err


def test_flags_train_and_the_export_is_simpletuners(config_file, tmp_path):
    path = config_file(out="flags")
    proc = relay(
        "train",
        "--config",
        str(path),
        "--max_train_steps",
        "2",
        "--checkpoint_step_interval=2",
        "--use_ema=false",
        "--validation_disable",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    [export] = (tmp_path / "flags").glob("sd35-*-lokr.safetensors")
    with safe_open(str(export), framework="pt") as fh:
        assert fh.metadata()["global_step"] == "2"
        assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.bfloat16}


def test_jobs_train_takes_flags_and_refuses_stray_words(config_file):
    proc = subprocess.run(
        [sys.executable, "jobs/train.py", "--config", str(config_file()), "stray"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "unexpected argument 'stray'" in proc.stderr
    assert "Traceback" not in proc.stderr
