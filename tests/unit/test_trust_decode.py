"""Class: input decoded wrong, silently. Every image goes through decode_image (upright, 8-bit,
transparency on white, as SimpleTuner does) and every caption through decode_caption (UTF-8 with or
without a BOM, UTF-16 with a BOM; anything else is a problem the image is skipped for); empty captions
are counted and reported."""

from __future__ import annotations

import codecs
import io
import json

import numpy as np
import pytest
from PIL import Image

from relay_train.config.files import DataBackendConfig
from relay_train.data.decode import CaptionError, decode_caption, decode_image
from relay_train.data.discovery import discover, inspect_image, report_problems
from relay_train.data.store import FileStore


def encoded(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    out = io.BytesIO()
    im.save(out, format=fmt, **kw)
    return out.getvalue()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(decode_image(data), dtype=np.int32)


@pytest.mark.parametrize("level", [0, 1000, 32768, 65535])
def test_16_bit_greyscale_keeps_its_tones(level):
    im = Image.fromarray(np.full((8, 8), level, dtype=np.uint16))  # Pillow's I;16
    got = pixels(encoded(im))
    assert got.shape == (8, 8, 3) and abs(int(got.mean()) - round(level / 257)) <= 1


def test_a_16_bit_gradient_is_not_clipped_to_white():
    ramp = np.tile(np.linspace(0, 65535, 64, dtype=np.uint16), (4, 1))
    got = pixels(encoded(Image.fromarray(ramp)))
    assert got[0, 0, 0] == 0 and got[0, -1, 0] == 255 and 120 <= got[0, 32, 0] <= 136


@pytest.mark.parametrize("orientation, size", [(6, (4, 8)), (8, (4, 8)), (3, (8, 4)), (1, (8, 4))])
def test_exif_orientation_is_applied(orientation, size):
    im = Image.new("RGB", (8, 4), "black")
    im.putpixel((0, 0), (255, 0, 0))  # the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encoded(im, "JPEG", exif=exif.tobytes(), quality=100)
    assert decode_image(data).size == size
    assert inspect_image(data) == (size, None)  # discovery sizes the upright image (the bucket follows it)


def _alpha(mode: str) -> bytes:
    if mode == "RGBA":
        return encoded(Image.new("RGBA", (4, 4), (0, 0, 0, 0)))
    if mode == "LA":
        return encoded(Image.new("LA", (4, 4), (0, 0)))
    if mode == "P":
        im = Image.new("P", (4, 4), 0)
        im.putpalette([0, 0, 0] * 256)
        return encoded(im, transparency=0)
    if mode == "RGB-key":
        return encoded(Image.new("RGB", (4, 4), (0, 0, 0)), transparency=(0, 0, 0))
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "RGB-key"])
def test_transparent_areas_train_white_never_black(mode):
    assert (pixels(_alpha(mode)) == 255).all()


def test_half_transparent_pixels_blend_onto_white():
    got = pixels(encoded(Image.new("RGBA", (2, 2), (0, 0, 0, 128))))
    assert 120 <= got.mean() <= 135


@pytest.mark.parametrize(
    "data",
    [
        b"a photo of a cat",
        codecs.BOM_UTF8 + b"a photo of a cat",
        "a photo of a cat".encode("utf-16"),  # with its BOM
        codecs.BOM_UTF16_BE + "a photo of a cat".encode("utf-16-be"),
        codecs.BOM_UTF16_LE + "a photo of a cat\n".encode("utf-16-le"),
    ],
)
def test_utf8_and_utf16_with_a_bom_decode(data):
    assert decode_caption(data) == "a photo of a cat"


@pytest.mark.parametrize(
    "data, word",
    [
        ("a photo of a cat".encode("utf-16-le"), "NUL"),  # UTF-16 without a BOM
        ("a café".encode("latin-1"), "UTF-8"),
        ("a photo".encode("utf-32"), "UTF-32"),
        (codecs.BOM_UTF16_LE + b"\x00\xd8", "UTF-16"),  # a lone surrogate
    ],
)
def test_other_encodings_are_problems_naming_why(data, word):
    with pytest.raises(CaptionError, match=word):
        decode_caption(data)


def test_discovery_skips_undecodable_captions_and_counts_empty_ones(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    png = encoded(Image.new("RGB", (64, 64), "grey"))
    captions = {
        "good": b"a cat",
        "bom16": "a dog".encode("utf-16"),
        "nobom16": "a bird".encode("utf-16-le"),
        "latin": "a café".encode("latin-1"),
        "empty": b"",
        "blank": b"  \n",
    }
    for stem, text in captions.items():
        (data / f"{stem}.png").write_bytes(png)
        (data / f"{stem}.txt").write_bytes(text)
    backend = DataBackendConfig(id="d", type="local", instance_data_dir=str(data))
    store, cache = FileStore(data), FileStore(tmp_path / "cache")
    found = discover(backend, store, cache, minimum_size=0)
    assert {r.key: r.caption for r in found.records} == {
        "good.png": "a cat",
        "bom16.png": "a dog",
        "empty.png": "",
        "blank.png": "",
    }
    assert sorted(k for k, _ in found.problems) == ["latin.png", "nobom16.png"]
    assert sorted(found.empty_captions) == ["blank.png", "empty.png"]
    report_problems(backend, store, cache, found.problems, False, found.empty_captions)
    report = json.loads(cache.read("problematic_images.json"))
    assert report["empty_captions"]["count"] == 2 and report["by_reason"] == {"caption": 2}
