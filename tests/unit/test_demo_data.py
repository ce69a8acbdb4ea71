"""The procedurally drawn demo dataset: counts, captions, aspect ratios, determinism."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from relay_train.demo.data import COLOURS, IMAGE_SIZES, SHAPES, make_demo_dataset


def _contents(root: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(root.iterdir())}


def test_writes_count_images_with_captions(tmp_path: Path) -> None:
    root = make_demo_dataset(tmp_path / "demo", count=12, seed=0)
    images = sorted(root.glob("*.png"))
    assert len(images) == 12
    for image in images:
        caption = image.with_suffix(".txt").read_text().strip()
        assert caption.startswith("a ") and caption.count(" background") == 1
        assert any(colour in caption for colour in COLOURS)
        assert any(shape in caption for shape in SHAPES)
    assert {f.suffix for f in root.iterdir()} == {".png", ".txt"}


def test_all_aspect_ratios_present(tmp_path: Path) -> None:
    root = make_demo_dataset(tmp_path / "demo", count=8)
    sizes = set()
    for image in root.glob("*.png"):
        with Image.open(image) as opened:
            sizes.add(opened.size)
            assert opened.mode == "RGB"
    assert sizes == set(IMAGE_SIZES)
    assert {(64, 64), (96, 64), (64, 96), (128, 64)} <= sizes


def test_caption_names_the_background_colour(tmp_path: Path) -> None:
    root = make_demo_dataset(tmp_path / "demo", count=8, seed=5)
    for image in root.glob("*.png"):
        background = image.with_suffix(".txt").read_text().split(" on a ")[-1].split(" background")[0]
        with Image.open(image) as opened:
            right, bottom = opened.width - 1, opened.height - 1
            corners = [opened.getpixel(xy) for xy in ((0, 0), (right, 0), (0, bottom), (right, bottom))]
        # Each shape is smaller than the image's height, so it can cover one corner at most.
        assert corners.count(COLOURS[background]) >= 2


def test_deterministic_and_idempotent(tmp_path: Path) -> None:
    first = _contents(make_demo_dataset(tmp_path / "a", count=10, seed=7))
    second = _contents(make_demo_dataset(tmp_path / "b", count=10, seed=7))
    assert first == second
    again = _contents(make_demo_dataset(tmp_path / "a", count=10, seed=7))
    assert again == first
    other = _contents(make_demo_dataset(tmp_path / "c", count=10, seed=8))
    assert other != first


def test_rejects_empty_count(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        make_demo_dataset(tmp_path / "demo", count=0)
