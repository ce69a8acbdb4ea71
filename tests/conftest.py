"""Shared fixtures: the tiny SD3 pipeline and the demo images, built once per test session."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Tests never reach the real Hub: anything that tries gets a refused loopback port at once.
os.environ.setdefault("HF_ENDPOINT", "http://127.0.0.1:9")
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from relay_train.tiny_model import make_pipeline

    return make_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd3")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    from relay_train.demo_data import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("data") / "demo", count=12)


@pytest.fixture
def make_config(tmp_path, tiny_model, demo_data):
    """The demo recipe pointed at this test's folders; keyword overrides use config key names."""
    from relay_train.config import load_config

    def build(data_dir: Path | None = None, out: str = "out", **overrides):
        backends = json.loads((REPO / "configs/demo/multidatabackend.json").read_text())
        backends[0]["instance_data_dir"] = str(data_dir or demo_data)
        backends[1]["cache_dir"] = str(tmp_path / "cache")
        backend_file = tmp_path / f"backends-{out}.json"
        backend_file.write_text(json.dumps(backends))
        base = {
            "pretrained_model_name_or_path": str(tiny_model),
            "data_backend_config": str(backend_file),
            "lycoris_config": str(REPO / "configs/demo/lycoris_config.json"),
            "output_dir": str(tmp_path / out),
        }
        return load_config(REPO / "configs/demo/config.json", {**base, **overrides})

    return build
