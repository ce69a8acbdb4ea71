"""What the model can take: bucket sides against the transformer's position embedding (read from the
model's own config files), and images over the decoder's pixel limit. Pure or local-disk only."""

from __future__ import annotations

import json
import struct
import zlib

from relay_train.data.buckets import bucket_for
from relay_train.data.plan import ModelLimits
from relay_train.data.discovery import inspect_image, problem_kind
from relay_train.demo.tiny_model import _TRANSFORMERS


def _model_folder(tmp_path, transformer: dict, vae_blocks: int = 4):
    for name, config in (("transformer", transformer), ("vae", {"block_out_channels": [128] * vae_blocks})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_sd35_medium_takes_up_to_36_to_1_at_1024_pixel_area(tmp_path):
    limits = ModelLimits.of(_model_folder(tmp_path, dict(_TRANSFORMERS["sd35m"])))
    assert (limits.pos_embed_max_size, limits.patch_size, limits.vae_scale, limits.max_side) == (384, 2, 8, 6144)
    assert limits.problem(bucket_for(3600, 100, 1024, "pixel_area", 2, 64)) is None  # 36:1 -> 6144x192
    reason = limits.problem(bucket_for(4000, 100, 1024, "pixel_area", 2, 64))  # 40:1
    assert reason.startswith("too big for the model: its bucket 6464x") and problem_kind(reason) == "too big for the model"
    assert limits.problem(bucket_for(100, 5000, 1024, "pixel_area", 2, 64)) is not None  # tall, too (1:50)


def test_a_model_without_a_position_embedding_limit_has_none(tmp_path):
    config = {k: v for k, v in _TRANSFORMERS["tiny"].items() if k != "pos_embed_max_size"}
    assert ModelLimits.of(_model_folder(tmp_path, config)) is None
    assert ModelLimits.of(tmp_path / "nowhere") is None  # no configs: nothing to check against


def test_pixel_count_limits_are_checked_from_the_header(demo_data):
    def png(width, height):
        def chunk(kind, data):
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        return (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b""))
            + chunk(b"IEND", b"")
        )

    for data in (png(30_000, 30_000), png(10_000, 10_000)):  # over 2x the limit (Pillow raises), and over it
        size, reason = inspect_image(data)
        assert size is None and problem_kind(reason) == "too many pixels", reason
    size, reason = inspect_image((demo_data / "0000.png").read_bytes(), max_pixels=100)
    assert size is None and "over the decoder's limit of 100" in reason
    assert problem_kind(inspect_image(png(64, 64))[1]) == "unreadable"  # a header with no pixel data
