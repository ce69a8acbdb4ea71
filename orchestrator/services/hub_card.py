"""The Hub repo's README.md: a `huggingface_hub.ModelCard` whose metadata is a `ModelCardData`.

Built from the settings and what the repo holds after a commit, nothing else (no clock), so the same
inputs give the same bytes and an unchanged card is never a new commit.
"""

from __future__ import annotations

import re
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from orchestrator.services.hub_plan import CHECKPOINTS, HubSettings

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
TAGS = ["lycoris", "lokr", "stable-diffusion-3", "text-to-image"]


def card_data(settings: HubSettings) -> ModelCardData:
    """The card's metadata block. A local base model is left out: the Hub rejects a path there."""
    base = settings.base_model if _HUB_ID.match(settings.base_model) and not Path(settings.base_model).exists() else None
    return ModelCardData(library_name="lycoris", pipeline_tag="text-to-image", tags=list(TAGS), base_model=base)


def model_card(
    settings: HubSettings,
    *,
    step: int | None,
    final: bool,
    checkpoints: list[int],
    images: dict[int, list[str]],
    scores: dict[int, dict],
) -> str:
    """README.md: what the adapter is, how it was trained, how it validates, how to load it."""
    s = settings
    adapter, ema = s.adapter_names
    progress = "unknown" if step is None else (f"{step}" + (f" of {s.total_steps}" if s.total_steps else ""))
    state = "final" if final else "training in progress"
    lines = [
        f"# {s.run_name}: LyCORIS LoKr adapter for {s.base_model}",
        "",
        f"Trained with Terminus Relay. Step {progress} ({state}).",
        "",
        "## Files",
        "",
        "| file | what it is |",
        "|---|---|",
    ]
    if s.push_adapters:
        lines += [
            f"| `{ema}` | the EMA of the adapter weights (recommended; present when EMA is on) |",
            f"| `{adapter}` | the adapter weights at step {step} |",
        ]
    if s.push_checkpoints:
        names = ", ".join(f"`checkpoint-{c}`" for c in checkpoints) or "none yet"
        kept = "every resumable checkpoint" if s.keep is None else f"the newest {s.keep} resumable checkpoints"
        lines.append(f"| `{CHECKPOINTS}/` | {kept}: {names} |")
    lines += ["", "## Training config", "", "| setting | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in s.summary.items())]
    if images or scores:
        lines += ["", "## Validation", ""]
        keys = sorted({k for row in scores.values() for k in row})
        if keys:
            lines += ["| step | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
            lines += [f"| {st} | " + " | ".join(_fmt(scores[st].get(k)) for k in keys) + " |" for st in sorted(scores)]
            lines.append("")
        latest = max(images, default=None)
        if latest is not None:
            lines += [f"Images at step {latest}:", "", *(f"![{Path(p).stem}]({p})" for p in images[latest])]
    lines += [
        "",
        "## How to load",
        "",
        "```python",
        "import torch",
        "from diffusers import StableDiffusion3Pipeline",
        "from huggingface_hub import hf_hub_download",
        "from lycoris import create_lycoris_from_weights",
        "",
        f'pipe = StableDiffusion3Pipeline.from_pretrained("{s.base_model}", torch_dtype=torch.bfloat16)',
        f'path = hf_hub_download("{s.repo_id}", "{ema if s.push_adapters else adapter}")',
        "wrapper, _ = create_lycoris_from_weights(1.0, path, pipe.transformer)",
        "wrapper.merge_to()  # or wrapper.apply_to() to keep it separate",
        'pipe.to("cuda")',
        "```",
        "",
    ]
    return str(ModelCard(f"---\n{card_data(settings).to_yaml()}\n---\n\n" + "\n".join(lines)))


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else ("" if value is None else str(value))
