"""Fixtures shared by the unit tests of the training config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

LYCORIS = {
    "algo": "lokr",
    "linear_dim": 10000,
    "linear_alpha": 1,
    "factor": 4,
    "full_matrix": True,
    "apply_preset": {"target_module": ["Attention"], "module_algo_map": {"Attention": {"factor": 2}}},
}
BACKENDS = [
    {"id": "images", "type": "local", "instance_data_dir": "data"},
    {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text"},
]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The working directory: a folder laid out like this repo, with a valid LyCORIS file and
    multidatabackend.json in configs/run/ for a config to point at."""
    run = tmp_path / "configs" / "run"
    run.mkdir(parents=True)
    (run / "lycoris_config.json").write_text(json.dumps(LYCORIS))
    (run / "multidatabackend.json").write_text(json.dumps(BACKENDS))
    monkeypatch.chdir(tmp_path)
    return tmp_path
