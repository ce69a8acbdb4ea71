"""Class: reproducible artifacts (the same tensors and metadata are the same bytes in every process;
a killed writer's temp files are removed at the next start), and options relay train would ignore
silently (noted at start-up; hub_model_id's form checked at config time)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from relay_train import checkpoint as ckpt
from relay_train.config import ConfigError, parse_config
from relay_train.config.notes import launch_only_note
from support.configs import raw_config

REPO = Path(__file__).resolve().parents[2]

WRITE = """
import sys, torch
from relay_train.checkpoint import save_adapters
meta = {f"key_{i:02d}": str(i) for i in range(40)} | {"lycoris_config": '{"algo": "lokr"}', "step": "7"}
tensors = {f"lycoris_block_{i}.lokr_w{j}": torch.full((3, 2), float(i * 10 + j)) for i in range(8) for j in (1, 2)}
save_adapters(tensors, tensors, meta, __import__("pathlib").Path(sys.argv[1]) / "a.safetensors",
              __import__("pathlib").Path(sys.argv[1]) / "a-ema.safetensors", dtype=torch.bfloat16)
"""


def test_the_same_adapter_is_the_same_bytes_in_every_process(tmp_path):
    outs = []
    for i in range(3):  # the library orders metadata by a per-process hash: several processes tell
        folder = tmp_path / str(i)
        folder.mkdir()
        subprocess.run([sys.executable, "-c", WRITE, str(folder)], check=True, cwd=REPO)
        outs.append([(folder / n).read_bytes() for n in ("a.safetensors", "a-ema.safetensors")])
    assert outs[0] == outs[1] == outs[2]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "0" / "a-ema.safetensors"), framework="pt") as fh:  # still a valid file
        assert fh.metadata()["ema"] == "true" and fh.metadata()["step"] == "7" and len(fh.keys()) == 16


@pytest.mark.parametrize(
    "leftover", [".sd35-run-lokr.safetensors.tmp-1a2b3c4d", ".sd35-run-lokr-ema.safetensors.tmp-deadbeef", ".x.json.tmp-00000000"]
)
def test_a_killed_writers_temp_files_are_removed_at_the_next_start(tmp_path, leftover):
    (tmp_path / leftover).write_bytes(b"half an adapter")
    (tmp_path / "sd35-run-lokr.safetensors").write_bytes(b"a finished export")
    with ckpt.RunLock(tmp_path):
        assert not (tmp_path / leftover).exists()
    assert (tmp_path / "sd35-run-lokr.safetensors").read_bytes() == b"a finished export"


@pytest.mark.parametrize("repo", ["a/b/c", "me/../x", "me/x--y", "https://huggingface.co/me/x", "me/x y", "me/x.git"])
def test_a_bad_hub_model_id_is_refused_at_config_time(tmp_path, repo):
    with pytest.raises(ConfigError, match="hub_model_id"):
        parse_config(raw_config(tmp_path, **{"--hub_model_id": repo, "--push_to_hub": True}), tmp_path)


@pytest.mark.parametrize(
    "extra, words",
    [
        ({"--push_to_hub": True, "--hub_model_id": "me/x"}, ["--push_to_hub"]),
        ({"--push_checkpoints_to_hub": True, "--hub_model_id": "me/x"}, ["--push_checkpoints_to_hub"]),
        ({"--webhook_config": '{"webhook_type": "raw", "callback_url": "http://127.0.0.1:1/h"}'}, ["--webhook_config"]),
        ({"--report_to": "wandb"}, ["--report_to=wandb"]),
        ({"--validation_prompt": "a cat", "--validation_step_interval": 5}, ["validation"]),
    ],
)
def test_options_only_the_cluster_path_carries_out_are_noted(tmp_path, extra, words):
    note = launch_only_note(parse_config(raw_config(tmp_path, **extra), tmp_path))
    assert note and all(w in note for w in words) and "relay launch" in note and "127.0.0.1" not in note


def test_a_plain_config_gets_no_note(tmp_path):
    assert launch_only_note(parse_config(raw_config(tmp_path), tmp_path)) is None


def test_the_hubs_bf16_copy_of_a_checkpoint_is_the_exports_bytes(tmp_path):
    """The Hub mirror sends a checkpoint's adapter in the export dtype: the same bytes Trainer.export writes
    (sorted header), not the library's per-process metadata order."""
    import torch

    from orchestrator.services.hub import as_export

    meta = {f"key_{i:02d}": str(i) for i in range(40)} | {"step": "7"}
    tensors = {f"lycoris_block_{i}.lokr_w1": torch.full((3, 2), i + 0.1) for i in range(8)}
    checkpoint, export = tmp_path / "ckpt.safetensors", tmp_path / "export.safetensors"
    ckpt.save_adapters(tensors, None, meta, checkpoint, tmp_path / "unused")
    ckpt.save_adapters(tensors, None, meta, export, tmp_path / "unused", dtype=torch.bfloat16)
    assert as_export(checkpoint, "bf16") == export.read_bytes()
    assert as_export(checkpoint, "fp32") == str(checkpoint)  # fp32: the checkpoint's own file, as is
