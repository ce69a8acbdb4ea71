"""CLIP score: how well each rendered image matches its own prompt, from a local CLIP model + processor.

The score is torchmetrics' clip_score (100 * max(cos, 0)). The model is read from a local folder or the
Hugging Face cache only: a validation actor must never stall on the network.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from relay_train.model import ModelNotFoundError


def resolve_clip_path(name_or_path: str) -> Path:
    """--validation_clip_model: a local folder, or a Hub id already in the Hugging Face cache (never downloads:
    a validation actor must not stall on the network)."""
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return local
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(name_or_path, local_files_only=True))
        except Exception:  # not in the cache: reported below
            pass
    raise ModelNotFoundError(
        f"--validation_clip_model: {name_or_path!r} is neither a local folder nor in the Hugging Face cache. "
        f"Download it first (`hf download {name_or_path}`) or point the key at a local CLIP folder "
        "(model + processor), or set --evaluation_type none."
    )


def clip_score(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Per pair, as torchmetrics' clip_score: 100 * max(cos(image_emb, text_emb), 0)."""
    image = torch.nn.functional.normalize(image_embeds.float(), dim=-1)
    text = torch.nn.functional.normalize(text_embeds.float(), dim=-1)
    return 100 * (image * text).sum(-1).clamp(min=0)


class ClipScorer:
    """CLIP score per image against its own prompt, from a local CLIP model + processor folder."""

    def __init__(self, path: Path, device: torch.device, batch: int = 16):
        from transformers import CLIPModel, CLIPProcessor

        self.device, self.batch = device, batch
        self.model = CLIPModel.from_pretrained(path, local_files_only=True).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(path, local_files_only=True)

    @torch.inference_mode()
    def score(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        scores: list[float] = []
        for start in range(0, len(images), self.batch):
            inputs = self.processor(
                text=prompts[start : start + self.batch],
                images=images[start : start + self.batch],
                return_tensors="pt",
                padding=True,
                truncation=True,
            )  # CLIP reads 77 tokens
            out = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
            scores += clip_score(out.image_embeds, out.text_embeds).tolist()  # host sync, once per batch
        return scores
