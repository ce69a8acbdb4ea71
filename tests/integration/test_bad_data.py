"""Bad images never crash the run: they are skipped, named in the log, and (on request) deleted."""

from __future__ import annotations

import logging
import shutil

from PIL import Image

from relay_train.config import DataBackendConfig
from relay_train.data import discover_images
from relay_train.trainer import build_trainer


def _sprinkle(folder, demo_data):
    folder.mkdir()
    for i in range(4):
        for suffix in (".png", ".txt"):
            shutil.copy(demo_data / f"{i:04d}{suffix}", folder / f"{i:04d}{suffix}")
    (folder / "garbage.png").write_bytes(b"not an image at all")
    (folder / "garbage.txt").write_text("garbage")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "empty.txt").write_text("empty")
    good = (demo_data / "0000.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "truncated.txt").write_text("truncated")
    Image.new("RGB", (8, 8), "red").save(folder / "tiny.png")
    (folder / "tiny.txt").write_text("a tiny red square")
    Image.new("RGB", (64, 64), "blue").save(folder / "uncaptioned.png")


def test_bad_files_are_skipped_and_named(tmp_path, demo_data, caplog):
    folder = tmp_path / "bad"
    _sprinkle(folder, demo_data)
    backend = DataBackendConfig(id="bad", instance_data_dir=str(folder))
    with caplog.at_level(logging.WARNING):
        records = discover_images(backend, minimum_size=32, delete_problematic=False)
    assert sorted(r.path.name for r in records) == ["0000.png", "0001.png", "0002.png", "0003.png"]
    message = caplog.text
    assert "skipped 5 image(s)" in message
    for name in ("garbage.png", "empty.jpg", "truncated.png", "tiny.png", "uncaptioned.png"):
        assert name in message
    assert (folder / "garbage.png").exists()  # nothing deleted unless asked


def test_delete_problematic_images_removes_only_unreadable_files(tmp_path, demo_data):
    folder = tmp_path / "bad"
    _sprinkle(folder, demo_data)
    backend = DataBackendConfig(id="bad", instance_data_dir=str(folder))
    discover_images(backend, minimum_size=32, delete_problematic=True)
    remaining = sorted(p.name for p in folder.glob("*.*") if p.suffix != ".txt")
    assert remaining == ["0000.png", "0001.png", "0002.png", "0003.png", "tiny.png", "uncaptioned.png"]


def test_training_runs_through_a_dirty_dataset(tmp_path, demo_data, make_config):
    folder = tmp_path / "bad"
    _sprinkle(folder, demo_data)
    config = make_config(data_dir=folder, max_train_steps=3, checkpointing_steps=3, minimum_image_size=32)
    result = build_trainer(config).fit()
    assert result.step == 3 and result.last_checkpoint.name == "checkpoint-3"
