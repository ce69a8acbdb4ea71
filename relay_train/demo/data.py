"""A small, procedurally drawn caption→image dataset for demos and tests.

Each sample is `NNNN.png` plus `NNNN.txt` holding a caption that describes what was drawn
("a large red circle and a small yellow square on a blue background"), so even a tiny model has
a learnable caption→image relation. Everything is a pure function of (index, seed).
"""

from __future__ import annotations

import io
import logging
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from relay_train.safe_write import write_atomic

log = logging.getLogger(__name__)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "orange": (245, 140, 30),
    "purple": (140, 60, 180),
    "pink": (240, 130, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "grey": (128, 128, 128),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
SIZE_WORDS: dict[str, float] = {"small": 0.3, "large": 0.6}  # shape extent / shorter image side
WORDS: tuple[str, ...] = ("sun", "sea", "go", "hi", "cat", "tree")
# (width, height): square, landscape, portrait and a wide panorama.
IMAGE_SIZES: tuple[tuple[int, int], ...] = ((64, 64), (96, 64), (64, 96), (128, 64))


def make_demo_dataset(path: str | Path, count: int = 36, seed: int = 0) -> Path:
    """Write `count` PNG images with same-stem `.txt` captions into `path`; return the folder.

    Sizes cycle through IMAGE_SIZES so every aspect appears once `count` >= 4. Calling it again
    with the same arguments rewrites byte-identical files.
    """
    if count < 1:
        raise ValueError(f"count must be positive, got {count}")
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        image, caption = draw_sample(index, seed)
        stem = root / f"{index:04d}"
        png = io.BytesIO()
        image.save(png, format="PNG")
        write_atomic(stem.with_suffix(".png"), png.getvalue())
        write_atomic(stem.with_suffix(".txt"), caption.encode() + b"\n")
    log.info("wrote %d demo samples to %s", count, root)
    return root


def draw_sample(index: int, seed: int = 0) -> tuple[Image.Image, str]:
    """The image and caption of sample `index`: a pure function of (index, seed)."""
    rng = random.Random(f"demo:{seed}:{index}")
    width, height = IMAGE_SIZES[index % len(IMAGE_SIZES)]
    background, first, second = rng.sample(sorted(COLOURS), 3)
    image = Image.new("RGB", (width, height), COLOURS[background])
    draw = ImageDraw.Draw(image)
    if rng.random() < 0.5:
        caption = _draw_shape(draw, rng, first, (0, width), height)
    else:
        # Two shapes split the width between them so neither hides the other.
        left = _draw_shape(draw, rng, first, (0, width // 2), height)
        right = _draw_shape(draw, rng, second, (width // 2, width), height)
        caption = f"{left} on the left and {right} on the right"
    caption += f" on a {background} background"
    if rng.random() < 0.25:
        word = rng.choice(WORDS)
        draw.text((2, height - 12), word, fill=COLOURS[second], font=ImageFont.load_default(size=10))
        caption += f' with the word "{word}"'
    return image, caption


def _draw_shape(draw: ImageDraw.ImageDraw, rng: random.Random, colour: str, x_span: tuple[int, int], height: int) -> str:
    """Draw one random shape inside the columns `x_span`; return its caption phrase."""
    shape = rng.choice(SHAPES)
    size_word = rng.choice(sorted(SIZE_WORDS))
    extent = max(6, int(SIZE_WORDS[size_word] * min(x_span[1] - x_span[0], height)))
    left = rng.randint(x_span[0], max(x_span[0], x_span[1] - extent))
    top = rng.randint(0, height - extent)
    box = (left, top, left + extent - 1, top + extent - 1)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon(_polygon(shape, box), fill=fill)
    return f"a {size_word} {colour} {shape}"


def _polygon(shape: str, box: tuple[int, int, int, int]) -> list[tuple[int, int]]:
    left, top, right, bottom = box
    mid_x, mid_y = (left + right) // 2, (top + bottom) // 2
    if shape == "triangle":
        return [(mid_x, top), (right, bottom), (left, bottom)]
    return [(mid_x, top), (right, mid_y), (mid_x, bottom), (left, mid_y)]
