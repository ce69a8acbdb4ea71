"""How an image file and a caption file become what trains: the one decoder for each, used by discovery
(which sizes and checks every file) and by the latent encoder (which trains on its pixels).

Images, as SimpleTuner 4.x loads them (helpers/image_manipulation/load.py: OpenCV applies the EXIF
orientation, transparency is composited on white):
- the EXIF orientation is applied, so a portrait photo trains upright (its size is the rotated one);
- 16-bit greyscale (Pillow's I;16 and I modes) is scaled to 8 bits (÷257), not clipped to white;
- palette, greyscale+alpha and colour-keyed images with transparency, and RGBA, are composited on
  white: transparent areas train white, never black;
- everything else (L, 1, CMYK, YCbCr, 16-bit RGB) converts to RGB as Pillow does.
Captions: UTF-8 (a byte-order mark is dropped) or UTF-16 with its byte-order mark; anything else
(UTF-16 without a mark, UTF-32, Latin-1 bytes that are not UTF-8) is a problem the file is skipped for.
"""

from __future__ import annotations

import codecs
import io

import numpy as np
from PIL import Image, ImageOps

DECODE_VERSION = 2  # part of every latent's cache key: a change here re-encodes what it changes
WHITE = (255, 255, 255)


class CaptionError(ValueError):
    """A caption file Relay cannot read as text; the message is the reason the image is skipped for."""


def decode_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """The file's pixels as an upright RGB image. Raises Pillow's errors for files it cannot decode,
    DecompressionBombError over `max_pixels` (default Pillow's MAX_IMAGE_PIXELS), checked from the header
    before any pixel is decoded."""
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    with Image.open(io.BytesIO(data)) as im:
        width, height = im.size
        if limit and width * height > limit:
            raise Image.DecompressionBombError(f"{width}x{height} = {width * height:,} pixels, over the limit of {limit:,}")
        im.load()  # decode fully: verify() alone passes truncated JPEGs
        im = ImageOps.exif_transpose(im)
        return _to_rgb(im)


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit greyscale: Pillow's convert("L") clips at 255 (nearly all white); scale 0..65535 to 0..255.
        values = np.asarray(im, dtype=np.float64)
        grey = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if im.mode in ("P", "L", "RGB", "1") and "transparency" in im.info:
        im = im.convert("RGBA")
    elif im.mode in ("LA", "PA", "La", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        canvas = Image.new("RGBA", im.size, (*WHITE, 255))
        canvas.alpha_composite(im)
        return canvas.convert("RGB")
    return im.convert("RGB")


_UTF32 = (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)  # checked before UTF-16: FF FE 00 00 starts with FF FE
_UTF16 = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


def decode_caption(data: bytes) -> str:
    """A caption file's text, stripped; CaptionError naming why it cannot be read."""
    if data.startswith(_UTF32):
        raise CaptionError("caption is UTF-32 text: save it as UTF-8")
    if data.startswith(_UTF16):
        try:
            text = data.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise CaptionError(f"caption is not valid UTF-16 (byte {exc.start}): save it as UTF-8") from None
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise CaptionError(
                f"caption is not UTF-8 text (byte {exc.start} cannot be decoded; Latin-1 or another code page?): save it as UTF-8"
            ) from None
    if "\x00" in text:
        raise CaptionError("caption holds NUL characters (UTF-16 without a byte-order mark?): save it as UTF-8")
    return text.strip()
