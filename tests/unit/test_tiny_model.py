"""The offline SD3 pipeline builder: layout, size, SD3 width rules, rendering, determinism."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

from relay_train.demo.tiny_model import PRESETS, make_pipeline, transformer_config

PROMPT = "a small red circle on a blue background"


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pipeline(tmp_path_factory.mktemp("tiny") / "sd3", preset="tiny", seed=0)


@pytest.fixture(scope="module")
def pipe(tiny_path: Path) -> StableDiffusion3Pipeline:
    return StableDiffusion3Pipeline.from_pretrained(tiny_path, local_files_only=True)


def _file_digests(root: Path) -> dict[str, str]:
    files = sorted(f for f in root.rglob("*") if f.is_file())
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def test_layout_matches_the_real_repo_and_is_small(tiny_path: Path) -> None:
    for component in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "scheduler"):
        assert (tiny_path / component).is_dir(), component
    for name in ("tokenizer", "tokenizer_2"):
        assert {"vocab.json", "merges.txt", "tokenizer.json"} <= {f.name for f in (tiny_path / name).iterdir()}
    assert (tiny_path / "tokenizer_3" / "spiece.model").is_file()
    assert (tiny_path / "model_index.json").is_file()
    total = sum(f.stat().st_size for f in tiny_path.rglob("*") if f.is_file())
    assert total < 10 * 2**20


def test_components_follow_sd3(pipe: StableDiffusion3Pipeline) -> None:
    assert type(pipe.transformer).__name__ == "SD3Transformer2DModel"
    assert pipe.vae.config.latent_channels == 16
    assert pipe.vae.config.shift_factor == pytest.approx(0.0609)
    assert pipe.vae.config.scaling_factor == pytest.approx(1.5305)
    assert pipe.vae_scale_factor == 8
    assert pipe.scheduler.config.shift == 3.0
    assert pipe.tokenizer.model_max_length == pipe.tokenizer_2.model_max_length == 77
    assert pipe.tokenizer_3.model_max_length >= 154


def test_vae_latents_are_16_channels_at_one_eighth(pipe: StableDiffusion3Pipeline) -> None:
    with torch.no_grad():
        mean = pipe.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert mean.shape == (1, 16, 8, 8)


def test_prompt_embedding_widths(pipe: StableDiffusion3Pipeline) -> None:
    config = pipe.transformer.config
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=PROMPT, prompt_2=PROMPT, prompt_3=PROMPT, max_sequence_length=154, do_classifier_free_guidance=False
        )
    assert embeds.shape == (1, 77 + 154, config.joint_attention_dim)
    assert pooled.shape == (1, config.pooled_projection_dim)
    assert negative is None and negative_pooled is None
    # Known words tokenize without falling back to <unk>.
    assert pipe.tokenizer_3.unk_token_id not in pipe.tokenizer_3(PROMPT).input_ids


@pytest.mark.parametrize(("width", "height"), [(64, 64), (96, 64), (64, 128)])
def test_renders_square_and_non_square(pipe: StableDiffusion3Pipeline, width: int, height: int) -> None:
    image = _render(pipe, width, height, seed=0, output_type="pil")[0]
    assert image.size == (width, height)


def test_rendering_is_deterministic(pipe: StableDiffusion3Pipeline) -> None:
    first = _render(pipe, 64, 64, seed=3, output_type="np")
    second = _render(pipe, 64, 64, seed=3, output_type="np")
    assert np.isfinite(first).all()
    np.testing.assert_array_equal(first, second)


def test_same_seed_same_files_other_seed_other_weights(tiny_path: Path, tmp_path: Path) -> None:
    again = _file_digests(make_pipeline(tmp_path / "again", seed=0))
    other = _file_digests(make_pipeline(tmp_path / "other", seed=1))
    original = _file_digests(tiny_path)
    assert again == original
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert other[weights] != original[weights]
    assert other["tokenizer_3/spiece.model"] == original["tokenizer_3/spiece.model"]


def test_make_pipeline_leaves_the_global_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    make_pipeline(tmp_path / "sd3")
    assert torch.equal(torch.rand(3), expected)


def test_unknown_preset_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown preset"):
        make_pipeline(tmp_path / "sd3", preset="huge")
    with pytest.raises(ValueError, match="unknown preset"):
        transformer_config("huge")


def test_sd35m_transformer_is_sd35_medium_sized() -> None:
    assert set(PRESETS) == {"tiny", "sd35m"}
    config = transformer_config("sd35m")
    assert config["dual_attention_layers"] == tuple(range(13))
    assert config["caption_projection_dim"] == config["num_attention_heads"] * config["attention_head_dim"]
    with torch.device("meta"):
        model = SD3Transformer2DModel(**config)
    count = sum(p.numel() for p in model.parameters())
    assert 2.2e9 <= count <= 2.6e9


def test_transformer_config_is_a_copy() -> None:
    transformer_config("tiny")["num_layers"] = 99
    assert transformer_config("tiny")["num_layers"] == 2


def _render(pipe: StableDiffusion3Pipeline, width: int, height: int, seed: int, output_type: str) -> Any:
    return pipe(
        PROMPT,
        width=width,
        height=height,
        num_inference_steps=2,
        guidance_scale=1.0,  # no CFG: one transformer pass per step
        max_sequence_length=154,
        generator=torch.Generator().manual_seed(seed),
        output_type=output_type,
    ).images
