"""The data pipeline end to end on the tiny model: local and S3 (moto on loopback) backends,
content-keyed caches, warm starts that load no encoder, bad data, parquet captions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from relay_train.data.buckets import BucketBatchSampler
from relay_train.config import load_config
from relay_train.data.encode import build_missing, encode_dataset
from relay_train.data.plan import plan_dataset

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


@pytest.fixture
def write_config(tmp_path, tiny_model):
    """A demo-recipe config whose multidatabackend.json is `images` plus a local text-embed cache."""

    def write(images: dict, name: str = "run", text_cache: Path | None = None, **overrides):
        backends = [
            {"id": "images", "resolution": 64, "resolution_type": "pixel_area", **images},
            {
                "id": "text",
                "dataset_type": "text_embeds",
                "default": True,
                "cache_dir": str(text_cache or tmp_path / name / "text"),
            },
        ]
        (tmp_path / f"{name}-backends.json").write_text(json.dumps(backends))
        over = {
            "pretrained_model_name_or_path": str(tiny_model),
            "lycoris_config": str(REPO / "configs/demo/lycoris_config.json"),
            "data_backend_config": str(tmp_path / f"{name}-backends.json"),
            "output_dir": str(tmp_path / name / "out"),
            **overrides,
        }
        return load_config(REPO / "configs/demo/config.json", over)

    return write


def upload(client, bucket: str, folder: Path, prefix: str) -> None:
    for path in sorted(folder.iterdir()):
        client.put_object(Bucket=bucket, Key=prefix + path.name, Body=path.read_bytes())


def s3_images(endpoint: str, bucket: str, **extra) -> dict:
    return {
        "type": "aws",
        "aws_bucket_name": bucket,
        "aws_data_prefix": "demo/",
        "aws_region_name": "us-east-1",
        "aws_endpoint_url": endpoint,
        "cache_dir_vae": "cache/vae",
        **extra,
    }


def epoch_batches(dataset):
    sampler = BucketBatchSampler(dataset.bucket_sizes(), 2, seed=3, keep_partial_batches=True)
    return [dataset.batch(*sampler.next_batch()) for _ in range(sampler.batches_per_epoch())]


def test_local_and_s3_yield_identical_batches(write_config, demo_data, s3_bucket, s3_endpoint):
    client, bucket = s3_bucket
    upload(client, bucket, demo_data, "demo/")
    local_cfg = write_config({"instance_data_dir": str(demo_data)}, "local")
    s3_cfg = write_config(s3_images(s3_endpoint, bucket), "s3")  # credentials: the environment's (the usual chain)
    local = encode_dataset(local_cfg, Path(local_cfg.pretrained_model_name_or_path), CPU, torch.float32)
    remote = encode_dataset(s3_cfg, Path(s3_cfg.pretrained_model_name_or_path), CPU, torch.float32)
    assert local.bucket_sizes() == remote.bucket_sizes() and sum(local.bucket_sizes().values()) == 12
    assert local.stats.latents == remote.stats.latents == 12
    cached = client.list_objects_v2(Bucket=bucket, Prefix="cache/vae/")["Contents"]
    assert sum(o["Key"].endswith(".safetensors") for o in cached) == 12  # the aws backend's latents live in its bucket
    for a, b in zip(epoch_batches(local), epoch_batches(remote), strict=True):
        assert torch.equal(a.latents, b.latents) and torch.equal(a.prompt_embeds, b.prompt_embeds)
        assert torch.equal(a.pooled_embeds, b.pooled_embeds)
    assert torch.equal(local.empty_prompt_embeds, remote.empty_prompt_embeds)


def model_of(config) -> Path:
    return Path(config.pretrained_model_name_or_path)


def test_warm_start_reads_caches_only_and_loads_no_encoder(write_config, demo_data, monkeypatch):
    config = write_config({"instance_data_dir": str(demo_data)})
    cold = encode_dataset(config, model_of(config), CPU, torch.float32)
    assert (cold.stats.latents, cold.stats.text) == (12, 13)  # 12 captions + the empty prompt

    import diffusers

    def refuse(*args, **kwargs):
        raise AssertionError("an encoder was loaded although the caches are complete")

    monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained", refuse)
    monkeypatch.setattr(diffusers.StableDiffusion3Pipeline, "from_pretrained", refuse)
    warm = encode_dataset(config, model_of(config), CPU, torch.float32)
    assert (warm.stats.latents, warm.stats.text) == (0, 0)
    for a, b in zip(epoch_batches(cold), epoch_batches(warm), strict=True):
        assert torch.equal(a.latents, b.latents) and torch.equal(a.prompt_embeds, b.prompt_embeds)


def test_only_changed_captions_and_images_are_recomputed(write_config, demo_data, tmp_path):
    folder = tmp_path / "data"
    shutil.copytree(demo_data, folder)
    config = write_config({"instance_data_dir": str(folder)}, compress_disk_cache=True)
    first = build_missing(plan_dataset(config, model_of(config)), model_of(config), CPU, torch.float32)
    assert (first.latents, first.text) == (12, 13)
    assert all(p.name.endswith(".safetensors.gz") for p in (tmp_path / "run/text").iterdir())
    again = plan_dataset(config, model_of(config))
    assert again.complete  # a second precompute has nothing to do
    assert build_missing(again, model_of(config), CPU, torch.float32).latents == 0
    (folder / "0003.txt").write_text("a brand new caption\n")
    from PIL import Image

    Image.new("RGB", (64, 64), "green").save(folder / "0005.png")
    plan = plan_dataset(config, model_of(config))
    assert (len(plan.missing_latents), len(plan.missing_text)) == (1, 1)
    stats = build_missing(plan, model_of(config), CPU, torch.float32)
    assert (stats.latents, stats.text) == (1, 1)


def test_interrupted_precompute_resumes_where_it_stopped(write_config, demo_data):
    config = write_config({"instance_data_dir": str(demo_data)}, vae_batch_size=4)
    done = []

    def stop_after_first_batch(what, count, total):
        done.append(count)
        raise KeyboardInterrupt  # a kill between two batches

    with pytest.raises(KeyboardInterrupt):
        build_missing(plan_dataset(config, model_of(config)), model_of(config), CPU, torch.float32, stop_after_first_batch)
    plan = plan_dataset(config, model_of(config))
    assert done == [4] and len(plan.missing_latents) == 8 and len(plan.missing_text) == 13
    assert build_missing(plan, model_of(config), CPU, torch.float32).latents == 8


def test_second_discovery_reads_no_image(write_config, demo_data, s3_bucket, s3_endpoint):
    from relay_train.data.plan import vae_cache_store
    from relay_train.data.discovery import discover
    from relay_train.data.store import image_store

    client, bucket = s3_bucket
    upload(client, bucket, demo_data, "demo/")
    config = write_config(s3_images(s3_endpoint, bucket))
    backend = config.data_backends[0]
    runs = [discover(backend, image_store(backend), vae_cache_store(config, backend), 0) for _ in range(2)]
    assert [r.files_read for r in runs] == [12, 0] and runs[0].records == runs[1].records


def test_credentials_from_the_entry(write_config, demo_data, s3_bucket, s3_endpoint, monkeypatch):
    client, bucket = s3_bucket
    upload(client, bucket, demo_data, "demo/")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    config = write_config(s3_images(s3_endpoint, bucket, aws_access_key_id="testing", aws_secret_access_key="testing"))
    assert len(plan_dataset(config, model_of(config)).buckets) == 4


def test_parquet_captions(write_config, demo_data, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "images"
    folder.mkdir()
    for path in sorted(demo_data.glob("*.png"))[:4]:
        shutil.copy(path, folder / path.name)
    table = pa.table(
        {
            "id": ["0000", "0001", "0002", "0003"],
            "caption": ["one", None, "three", "four"],
            "alt": ["uno", "dos", "tres", "cuatro"],
        }
    )
    pq.write_table(table, folder / "captions.parquet")
    config = write_config(
        {
            "instance_data_dir": str(folder),
            "caption_strategy": "parquet",
            "parquet": {
                "path": "captions.parquet",
                "filename_column": "id",
                "caption_column": "caption",
                "fallback_caption_column": "alt",
            },
        }
    )
    plan = plan_dataset(config, model_of(config))
    assert sorted(plan.captions.values()) == ["", "dos", "four", "one", "three"]


def test_skip_file_discovery_trusts_the_saved_index(write_config, demo_data, tmp_path):
    folder = tmp_path / "data"
    shutil.copytree(demo_data, folder)
    config = write_config({"instance_data_dir": str(folder)})
    build_missing(plan_dataset(config, model_of(config)), model_of(config), CPU, torch.float32)
    shutil.copy(folder / "0000.png", folder / "new.png")
    (folder / "new.txt").write_text("a newcomer")
    skipping = write_config({"instance_data_dir": str(folder)}, skip_file_discovery="vae aspect text metadata")
    plan = plan_dataset(skipping, model_of(skipping))
    assert plan.complete and sum(map(len, plan.buckets.values())) == 12  # the newcomer waits for a discovery
    assert len(plan_dataset(config, model_of(config)).missing_text) == 1
