"""The run's names, defined once (relay_train/artifacts.py), and the one rule for "committed"."""

from __future__ import annotations

import argparse
from pathlib import Path

from orchestrator.cli import DEMO, demo_outputs
from relay_train import artifacts as a

ROOT = Path(__file__).resolve().parents[2]


def test_checkpoint_names_round_trip_and_reject_look_alikes():
    assert a.checkpoint_name(500) == "checkpoint-500" and a.step_of("checkpoint-500") == 500
    assert [a.step_of(n) for n in ("checkpoint-5.partial", "checkpoint-", "ckpt-5", "checkpoint-x")] == [None] * 4


def test_committed_means_the_manifest_is_there_in_every_store():
    files = {"checkpoint-4/adapter.safetensors", "checkpoint-4/manifest.json", "checkpoint-6/adapter.safetensors"}
    assert a.is_committed(files.__contains__, "checkpoint-4") and not a.is_committed(files.__contains__, "checkpoint-6")
    hub = {f"checkpoints/{f}" for f in files} | {"validation/step-4/0.png", "README.md"}
    assert a.hub_committed_steps(hub) == {4}  # checkpoint-6 is a torn upload


def test_the_run_writes_under_these_names():
    assert a.adapter_names("demo") == ("sd35-demo-lokr.safetensors", "sd35-demo-lokr-ema.safetensors")
    assert a.validation_folder(a.BENCHMARK) == "relay/validation/base"
    assert a.validation_folder(300) == "relay/validation/checkpoint-300"
    assert a.hub_checkpoint_folder(300) == "checkpoints/checkpoint-300/" and a.hub_validation_folder(3) == "validation/step-3/"
    assert a.base_model_name("stabilityai/stable-diffusion-3.5-medium") == "stabilityai/stable-diffusion-3.5-medium"
    assert a.base_model_name("/home/me/models/sd35m") == "sd35m"  # never the training machine's path


def _demo(sets=(), flags=(), cluster_sets=()) -> argparse.Namespace:
    return argparse.Namespace(
        config=ROOT / DEMO / "config.json",
        cluster=ROOT / DEMO / "cluster.json",
        set=list(sets),
        config_flags=list(flags),
        cluster_set=list(cluster_sets),
    )


def test_the_demo_says_where_its_outputs_are_as_configured():
    default = demo_outputs(_demo())
    assert default in (ROOT / "README.md").read_text()  # the README shows what the demo prints
    moved = demo_outputs(
        _demo(["output_dir=/tmp/x/mine"], ["--checkpoints_total_limit=3"], ["storage_path=s3://b/p/", "run_name=r2"])
    )
    assert moved.splitlines()[2:] == [
        "  adapter       /tmp/x/mine/sd35-mine-lokr.safetensors (and -ema)",
        "  checkpoints   s3://b/p/r2/checkpoint-*/ (newest 3)",
        "  validation    s3://b/p/r2/relay/validation/checkpoint-*/grid.png",
        "  ledger        s3://b/p/r2/relay/ledger.jsonl",
        "  status        relay status r2 --storage s3://b/p/",
    ]
