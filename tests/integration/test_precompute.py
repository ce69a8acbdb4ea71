"""jobs/precompute.py on a real (2-CPU, local) Ray: Ray Data map_batches over encoder actors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    # address="local": a fresh 2-CPU instance even when another Ray runs on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def load_job():
    spec = importlib.util.spec_from_file_location("precompute_job", REPO / "jobs/precompute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_ray_precompute_builds_once_then_training_reads_only_caches(ray_local, config_file, tmp_path, monkeypatch):
    job = load_job()
    config = config_file(vae_batch_size=4)
    first = job.main(["--config", str(config)])
    assert first == {"latents": 12, "text": 13, "failed": 0, "bad_files": 0}
    assert job.main(["--config", str(config)])["latents"] == 0  # a second run encodes nothing

    import diffusers

    from relay_train.config import load_config
    from relay_train.data.encode import encode_dataset

    def refuse(*args, **kwargs):
        raise AssertionError("an encoder was loaded although precompute filled the caches")

    monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained", refuse)
    monkeypatch.setattr(diffusers.StableDiffusion3Pipeline, "from_pretrained", refuse)
    loaded = load_config(config)
    dataset = encode_dataset(loaded, Path(loaded.pretrained_model_name_or_path), torch.device("cpu"), torch.float32)
    assert sum(dataset.bucket_sizes().values()) == 12 and dataset.stats.latents == 0
