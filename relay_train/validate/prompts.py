"""The validation prompts: the run's own prompt, our built-in library and an optional user file.

The library is written for what Terminus Relay trains towards (see the model card): legible text in
scenes (signs, handwriting, typography, labels) and clean stock-photo composition. Each prompt has a
short stable name; image files and scores are keyed by it, so renames break comparisons across runs:
add prompts, do not rename them.
"""

from __future__ import annotations

import re
from pathlib import Path

from relay_train import json_text
from relay_train.config import TrainConfig

__all__ = ["PROMPT_LIBRARY", "read_prompt_file", "validation_prompts", "slug"]

PROMPT_LIBRARY: dict[str, str] = {
    # text rendering
    "neon-open": 'a glowing pink neon sign in a rainy diner window that reads "OPEN ALL NIGHT"',
    "street-sign": 'a green street sign on a lamp post at the corner of "Relay Ave" and "Baton St", overcast sky',
    "chalkboard-menu": 'a café chalkboard menu on the pavement listing "Coffee 3" and "Croissant 2" in white chalk',
    "shop-awning": 'a striped shop awning with the words "FRESH BREAD" painted in bold serif letters',
    "billboard": 'a roadside billboard at dusk advertising "TERMINUS" in huge white sans-serif capitals',
    "road-marking": 'the word "SLOW" painted in white on wet asphalt, seen from above',
    # handwriting and paper
    "sticky-note": 'a yellow sticky note on a laptop screen, handwritten in blue ink: "call mom at 5"',
    "letter": 'a handwritten letter on lined paper beginning "Dear Sam," in neat cursive, a fountain pen beside it',
    "notebook-maths": "an open notebook page with handwritten algebra, x + 2 = 7, pencil smudges, desk lamp light",
    "postcard": 'the back of a vintage postcard with a stamp and the note "wish you were here" in faded ink',
    "whiteboard": 'an office whiteboard with a marker diagram and the heading "Q3 PLAN" underlined twice',
    # typography and design
    "book-cover": 'a minimalist book cover titled "The Long Relay" in elegant gold serif type on navy blue',
    "poster": 'a Swiss-style concert poster with the text "JAZZ NIGHT 8PM" in a bold grid layout',
    "logo-mug": 'a white ceramic mug on a wooden table printed with the logo "Morning Club"',
    "t-shirt": 'a folded grey t-shirt with "HELLO WORLD" printed across the chest in a retro font',
    "label-jar": 'a glass jar of honey with a kraft paper label reading "Wildflower Honey 250g"',
    "receipt": 'a crumpled paper receipt on a counter, the total "$12.50" printed at the bottom',
    # stock-photo scenes
    "office-meeting": "a diverse team in a bright office meeting room, laughing around a table, natural light",
    "kitchen-cook": "a man chopping vegetables in a sunlit home kitchen, shallow depth of field",
    "city-crosswalk": "pedestrians crossing a busy city street at golden hour, motion blur, 35mm photo",
    "mountain-hiker": "a hiker with a red backpack on a ridge above the clouds, wide landscape photo",
    "dog-park": "a golden retriever catching a frisbee in a green park, sharp focus, summer afternoon",
    "portrait-window": "a portrait of an elderly woman by a window, soft side light, film grain",
    "product-shoe": "a studio product photo of a white running shoe on a pastel blue background",
    "food-flatlay": "an overhead flat lay of breakfast: pancakes, berries, coffee, on a marble table",
    "train-station": 'a train station platform with a departure board showing "PLATFORM 4 ON TIME"',
}
"""name -> prompt. Written for this project; covers text, handwriting, typography and photo scenes."""


def slug(text: str, limit: int = 40) -> str:
    """A filename-safe name: lowercase words joined by '-', at most `limit` characters."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    name = "-".join(words)[:limit].strip("-")
    return name or "prompt"


def read_prompt_file(path: Path) -> list[tuple[str, str]]:
    """A user prompt library: a JSON list of prompts, a JSON object of name -> prompt, or text lines.

    Blank lines and lines starting with '#' are skipped in text files. Names come from the object's keys
    or from the prompt's words ('user-<slug>')."""
    text = Path(path).read_text()
    if Path(path).suffix.lower() == ".json":
        try:
            data = json_text.loads(text)
        except ValueError as exc:
            raise ValueError(f"--validation_prompt_file {path}: not valid JSON ({exc})") from exc
        if isinstance(data, dict) and all(isinstance(v, str) for v in data.values()):
            return [(slug(str(name)), prompt) for name, prompt in data.items()]
        if isinstance(data, list) and all(isinstance(v, str) for v in data):
            return [(f"user-{slug(prompt, 30)}", prompt) for prompt in data]
        raise ValueError(f"--validation_prompt_file {path}: expected a JSON list of strings or an object of name -> prompt")
    lines = [line.strip() for line in text.splitlines()]
    return [(f"user-{slug(line, 30)}", line) for line in lines if line and not line.startswith("#")]


def validation_prompts(config: TrainConfig) -> list[tuple[str, str]]:
    """(name, prompt) pairs, in render order: validation_prompt, then the library, then the user file.

    Names are unique (a repeated name gets '-2', '-3'); an empty result means nothing to render."""
    pairs: list[tuple[str, str]] = []
    if config.validation_prompt:
        pairs.append(("validation", config.validation_prompt))
    if config.validation_prompt_library:
        pairs += list(PROMPT_LIBRARY.items())
    if config.validation_prompt_file is not None:
        pairs += read_prompt_file(Path(config.validation_prompt_file))
    seen: dict[str, int] = {}
    unique = []
    for name, prompt in pairs:
        seen[name] = seen.get(name, 0) + 1
        unique.append((name if seen[name] == 1 else f"{name}-{seen[name]}", prompt))
    return unique
