"""The run's names, defined once (relay_train/artifacts.py), and the one rule for "committed"."""

from __future__ import annotations

from relay_train import artifacts as a


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
