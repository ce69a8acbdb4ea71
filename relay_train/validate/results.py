"""What a validation produced: the rendered images, their CLIP scores, the grid, and scores.json.

A finished validation is a folder of PNGs, grid.png, then scores.json written last as the marker; the
same records go to the run's storage, the ledger, the trackers and the webhooks.
"""

from __future__ import annotations

import io
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from relay_train.safe_write import make_dir, write_atomic

BASE, ADAPTER, EMA = "base", "adapter", "ema"  # variant names: file prefixes and grid columns
SCORES, GRID = "scores.json", "grid.png"


@dataclass
class RenderedImage:
    variant: str
    prompt_name: str
    prompt: str
    seed: int
    width: int
    height: int
    image: Image.Image
    clip_score: float | None = None

    @property
    def filename(self) -> str:
        return f"{self.variant}-{self.prompt_name}-seed{self.seed}-{self.width}x{self.height}.png"

    def png(self) -> bytes:
        buffer = io.BytesIO()
        self.image.save(buffer, format="PNG")
        return buffer.getvalue()

    def record(self) -> dict[str, Any]:
        return {
            "file": self.filename,
            "variant": self.variant,
            "prompt_name": self.prompt_name,
            "prompt": self.prompt,
            "seed": self.seed,
            "width": self.width,
            "height": self.height,
            "clip_score": self.clip_score,
        }


def aggregate(scores: list[float]) -> dict[str, float]:
    """min, mean, max and population std (a step's images are the whole population, not a sample)."""
    return {
        "min": min(scores),
        "mean": statistics.fmean(scores),
        "max": max(scores),
        "std": statistics.pstdev(scores),
        "count": len(scores),
    }


@dataclass
class ValidationResult:
    step: int
    images: list[RenderedImage]
    seconds: float
    variants: list[str] = field(default_factory=list)

    def scores(self) -> dict[str, dict[str, float]]:
        """Per variant: min/mean/max/std of the CLIP scores ({} when unscored)."""
        out = {}
        for variant in self.variants:
            values = [i.clip_score for i in self.images if i.variant == variant and i.clip_score is not None]
            if values:
                out[variant] = aggregate(values)
        return out

    def summary(self) -> dict[str, Any]:
        """What scores.json holds, and what a ledger, tracker or webhook needs."""
        return {
            "step": self.step,
            "seconds": round(self.seconds, 3),
            "variants": self.variants,
            "scores": self.scores(),
            "images": [i.record() for i in self.images],
            "grid": GRID,
        }

    def grid(self) -> Image.Image:
        """One row per (prompt, size), one column per variant: base | adapter | ema side by side."""
        rows = list(dict.fromkeys((i.prompt_name, i.width, i.height) for i in self.images))
        cell_w = max(i.width for i in self.images)
        cell_h = max(i.height for i in self.images)
        header, gap = 14, 2
        grid = Image.new("RGB", (len(self.variants) * (cell_w + gap), header + len(rows) * (cell_h + gap)), "white")
        draw = ImageDraw.Draw(grid)
        for col, variant in enumerate(self.variants):
            draw.text((col * (cell_w + gap) + 2, 1), variant, fill="black")
        for image in self.images:
            col = self.variants.index(image.variant)
            row = rows.index((image.prompt_name, image.width, image.height))
            grid.paste(image.image, (col * (cell_w + gap), header + row * (cell_h + gap)))
        return grid

    def files(self) -> list[tuple[str, bytes]]:
        """(name, PNG bytes): every image, then grid.png. scores.json is written after these, as the marker."""
        buffer = io.BytesIO()
        self.grid().save(buffer, format="PNG")
        return [(i.filename, i.png()) for i in self.images] + [(GRID, buffer.getvalue())]


def save(result: ValidationResult, folder: Path) -> list[Path]:
    """PNGs, grid.png, then scores.json last: a folder with scores.json is a finished validation."""
    folder = Path(folder)
    make_dir(folder)
    paths = []
    for name, data in result.files():
        write_atomic(folder / name, data)
        paths.append(folder / name)
    write_atomic(folder / SCORES, json.dumps(result.summary(), indent=1, sort_keys=True).encode())
    return paths + [folder / SCORES]
