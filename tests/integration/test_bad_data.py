"""Bad images never crash the run: they are skipped, counted, listed in a report in the cache
directory, and (on request) deleted from local backends, never from S3."""

from __future__ import annotations

import json
import logging
import shutil

from PIL import Image

from relay_train.config import DataBackendConfig
from relay_train.data.plan import plan_dataset
from relay_train.data.discovery import REPORT_NAME, discover, report_problems
from relay_train.data.store import FileStore, image_store
from relay_train.trainer import build_trainer

BAD = {
    "garbage.png": "unreadable",
    "empty.jpg": "empty file",
    "truncated.png": "unreadable",
    "truncated.jpg": "unreadable",
    "tiny.png": "too small",
    "uncaptioned.png": "no caption",
}


def _sprinkle(folder, demo_data):
    folder.mkdir()
    for i in range(4):
        for suffix in (".png", ".txt"):
            shutil.copy(demo_data / f"{i:04d}{suffix}", folder / f"{i:04d}{suffix}")
    (folder / "garbage.png").write_bytes(b"not an image at all")
    (folder / "empty.jpg").write_bytes(b"")
    good = (demo_data / "0000.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    jpeg = folder / "whole.jpg"
    Image.open(demo_data / "0000.png").convert("RGB").save(jpeg, quality=90)
    (folder / "truncated.jpg").write_bytes(jpeg.read_bytes()[:-200])  # passes PIL's verify(), fails to decode
    jpeg.unlink()
    Image.new("RGB", (8, 8), "red").save(folder / "tiny.png")
    Image.new("RGB", (64, 64), "blue").save(folder / "uncaptioned.png")
    for name in BAD:
        if name != "uncaptioned.png":
            (folder / name).with_suffix(".txt").write_text(f"caption for {name}")


def _discover(folder, cache, delete=False):
    backend = DataBackendConfig(id="bad", instance_data_dir=str(folder))
    store, cache_store = image_store(backend), FileStore(cache)
    found = discover(backend, store, cache_store, minimum_size=32)
    deleted = report_problems(backend, store, cache_store, found.problems, delete)
    return found, deleted


def test_bad_files_are_skipped_counted_and_reported(tmp_path, demo_data, caplog):
    folder = tmp_path / "bad"
    _sprinkle(folder, demo_data)
    with caplog.at_level(logging.WARNING):
        found, deleted = _discover(folder, tmp_path / "cache")
    assert sorted(r.key for r in found.records) == ["0000.png", "0001.png", "0002.png", "0003.png"]
    assert "skipped 6 image(s)" in caplog.text and all(name in caplog.text for name in BAD)
    report = json.loads((tmp_path / "cache" / REPORT_NAME).read_text())
    assert report["count"] == 6
    assert report["by_reason"] == {"unreadable": 3, "empty file": 1, "too small": 1, "no caption": 1}
    assert {f["file"].rsplit("/", 1)[1] for f in report["files"]} == set(BAD)
    assert deleted == [] and (folder / "garbage.png").exists()  # nothing deleted unless asked


def test_delete_problematic_images_removes_only_unreadable_local_files(tmp_path, demo_data, caplog):
    folder = tmp_path / "bad"
    _sprinkle(folder, demo_data)
    with caplog.at_level(logging.WARNING):
        _, deleted = _discover(folder, tmp_path / "cache", delete=True)
    remaining = sorted(p.name for p in folder.glob("*.*") if p.suffix != ".txt")
    assert remaining == ["0000.png", "0001.png", "0002.png", "0003.png", "tiny.png", "uncaptioned.png"]
    assert len(deleted) == 4 and "deleted 4 problematic image(s)" in caplog.text


def test_s3_bad_files_are_reported_and_never_deleted(tmp_path, demo_data, s3_bucket, s3_endpoint, make_config, caplog):
    client, bucket = s3_bucket
    folder = tmp_path / "bad"
    _sprinkle(folder, demo_data)
    for path in folder.iterdir():
        client.put_object(Bucket=bucket, Key="bad/" + path.name, Body=path.read_bytes())
    config = make_config(minimum_image_size=32, delete_problematic_images=True)
    s3 = DataBackendConfig(
        id="s3bad",
        type="aws",
        aws_bucket_name=bucket,
        aws_data_prefix="bad/",
        aws_region_name="us-east-1",
        aws_endpoint_url=s3_endpoint,
        cache_dir_vae="cache/vae",
    )
    config = config.model_copy(update={"data_backends": [s3, *config.data_backends[1:]]})
    with caplog.at_level(logging.WARNING):
        plan = plan_dataset(config, tmp_path)
    assert plan.problems == 6 and sum(map(len, plan.buckets.values())) == 4
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert {"bad/" + name for name in BAD} <= keys  # S3 data is never modified
    assert "leaves S3 objects alone" in caplog.text
    report = json.loads(client.get_object(Bucket=bucket, Key="cache/vae/" + REPORT_NAME)["Body"].read())
    assert report["count"] == 6 and not any(f["deleted"] for f in report["files"])


def test_training_runs_through_a_dirty_dataset(tmp_path, demo_data, make_config):
    folder = tmp_path / "bad"
    _sprinkle(folder, demo_data)
    config = make_config(data_dir=folder, max_train_steps=3, checkpointing_steps=3, minimum_image_size=32)
    result = build_trainer(config).fit()
    assert result.step == 3 and result.last_checkpoint.name == "checkpoint-3"
    report = json.loads((tmp_path / "out/cache/vae/demo-images" / REPORT_NAME).read_text())
    assert report["count"] == 6
