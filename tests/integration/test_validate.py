"""Validation renders on the tiny SD3 pipeline (CPU): prompts, seeds, sizes, variants, CLIP, exact repeats."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from relay_train import checkpoint as ckpt
from relay_train.config import ConfigError, load_config
from relay_train.trainer import build_trainer
from relay_train.validate.clip import clip_score
from relay_train.validate.render import Validator, adapter_variants, checkpoint_variants, rescale_guidance
from relay_train.validate.results import ADAPTER, BASE, EMA, SCORES, save

REPO = Path(__file__).resolve().parents[2]
VALIDATION = dict(
    validation_num_inference_steps=2,
    validation_resolution="32x32,64x32",
    validation_guidance=4.0,
    validation_prompt="a red circle",
    evaluation_type="clip",
    use_ema=True,
    ema_validation="comparison",
    ema_update_interval=1,
    ema_decay=0.5,
    validation_seed=7,
)


def write_config(folder: Path, tiny_model: Path, demo_data: Path, **overrides) -> Path:
    """The demo recipe pointed at folder (as tests/conftest.py's config_file, but usable by module fixtures)."""
    from relay_train.demo.recipe import write_recipe

    drop = ("ema_update_interval", "use_ema", "ema_validation")
    return write_recipe(
        folder,
        tiny_model,
        demo_data,
        drop=drop,
        **{"max_train_steps": 4, "checkpointing_steps": 2, "train_batch_size": 2, **overrides},
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model, demo_data, tiny_clip):
    """A 4-step run (checkpoints 2 and 4, with EMA) and a validator on its config; (config path, checkpoint, validator)."""
    folder = tmp_path_factory.mktemp("validate")
    (folder / "prompts.json").write_text(json.dumps(["a sign that says OPEN"]))
    path = write_config(
        folder,
        tiny_model,
        demo_data,
        validation_clip_model=str(tiny_clip),
        validation_prompt_file=str(folder / "prompts.json"),
        **VALIDATION,
    )
    config = load_config(path)
    build_trainer(config).fit()
    validator = Validator(config, tiny_model, torch.device("cpu"))
    return path, folder / "out" / "checkpoint-4", validator


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def test_every_prompt_seed_size_and_variant_renders_and_repeats_exactly(run, tmp_path):
    path, checkpoint, validator = run
    adapters = {BASE: None, **checkpoint_variants(validator.config, checkpoint)}
    assert list(adapters) == [BASE, ADAPTER, EMA]  # comparison: live adapter and EMA side by side
    result = validator.render(adapters, step=4)

    got = {(i.variant, i.prompt_name, i.width, i.height) for i in result.images}
    expected = {
        (v, p, w, h) for v in adapters for p in ("validation", "user-a-sign-that-says-open") for w, h in ((32, 32), (64, 32))
    }
    assert got == expected and len(result.images) == 12
    for image in result.images:
        assert image.image.size == (image.width, image.height)
        assert image.seed == 7
        assert image.filename == f"{image.variant}-{image.prompt_name}-seed7-{image.width}x{image.height}.png"
        assert 0.0 <= image.clip_score <= 100.0
    by_key = {(i.variant, i.prompt_name, i.width): pixels(i.image) for i in result.images}
    assert not np.array_equal(by_key[ADAPTER, "validation", 32], by_key[BASE, "validation", 32])  # the adapter acts
    assert not np.array_equal(by_key[ADAPTER, "validation", 32], by_key[EMA, "validation", 32])

    scores = result.scores()
    assert set(scores) == {BASE, ADAPTER, EMA}
    for variant, agg in scores.items():
        values = [i.clip_score for i in result.images if i.variant == variant]
        assert agg["min"] == min(values) and agg["max"] == max(values) and agg["count"] == 4
        assert agg["mean"] == pytest.approx(np.mean(values)) and agg["std"] == pytest.approx(np.std(values))

    again = validator.render({ADAPTER: checkpoint / ckpt.ADAPTER}, step=4)  # same checkpoint, same seed
    for image in again.images:
        assert np.array_equal(pixels(image.image), by_key[ADAPTER, image.prompt_name, image.width])
    assert validator.loads == 1  # both validations used the pipeline loaded once

    written = save(result, tmp_path / "val")
    assert written[-1].name == SCORES  # written last: its presence marks a finished validation
    summary = json.loads((tmp_path / "val" / SCORES).read_text())
    assert summary["step"] == 4 and summary["variants"] == [BASE, ADAPTER, EMA]
    assert {r["file"] for r in summary["images"]} == {p.name for p in written[:-2]}
    grid = Image.open(tmp_path / "val" / "grid.png")
    assert grid.width >= 3 * 64 and grid.height >= 4 * 32  # 3 variant columns, 4 (prompt, size) rows
    assert Image.open(tmp_path / "val" / result.images[0].filename).size == (32, 32)


def test_strength_zero_reproduces_the_base_exactly(run):
    _, checkpoint, validator = run
    adapter = checkpoint / ckpt.ADAPTER
    config = validator.config
    try:
        validator.config = config.model_copy(update={"validation_lycoris_strength": 0.0, "validation_resolution": "32x32"})
        zero = validator.render({BASE: None, ADAPTER: adapter}, step=4)
        validator.config = config.model_copy(update={"validation_resolution": "32x32"})
        # and the base is restored exactly after an adapter ran at full strength
        validator.render({ADAPTER: adapter}, step=4)
        after = validator.render({BASE: None}, step=4)
    finally:
        validator.config = config
    half = len(zero.images) // 2
    for base, adapted in zip(zero.images[:half], zero.images[half:]):
        assert (base.variant, adapted.variant) == (BASE, ADAPTER) and base.prompt == adapted.prompt
        assert np.array_equal(pixels(base.image), pixels(adapted.image))
    assert all(np.array_equal(pixels(a.image), pixels(b.image)) for a, b in zip(zero.images[:half], after.images))


def test_guidance_rescale_matches_the_formula_and_changes_the_render(run):
    guided, cond = torch.randn(2, 4, 8, 8) * 3, torch.randn(2, 4, 8, 8)
    assert torch.equal(rescale_guidance(guided, cond, 0.0), guided)
    full = rescale_guidance(guided, cond, 1.0)
    assert torch.allclose(full.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)), rtol=1e-5)

    _, _, validator = run
    plain = validator.render_one("a red circle", 32, 32)
    validator.config = validator.config.model_copy(update={"validation_guidance_rescale": 0.7})
    try:
        rescaled = validator.render_one("a red circle", 32, 32)
    finally:
        validator.config = validator.config.model_copy(update={"validation_guidance_rescale": 0.0})
    assert not np.array_equal(pixels(plain), pixels(rescaled))
    assert np.array_equal(pixels(plain), pixels(validator.render_one("a red circle", 32, 32)))  # hooks removed


def test_clip_score_is_torchmetrics_formula():
    image = torch.tensor([[1.0, 0.0], [3.0, 4.0], [1.0, 0.0]])
    text = torch.tensor([[2.0, 0.0], [4.0, 3.0], [-1.0, 0.0]])
    # cos = 1, 24/25, -1 (clamped to 0)
    assert torch.allclose(clip_score(image, text), torch.tensor([100.0, 96.0, 0.0]))


def test_ema_validation_policy(make_config):
    a, e = Path("adapter.safetensors"), Path("adapter_ema.safetensors")
    config = make_config()
    for mode, expected in (("none", {ADAPTER: a}), ("ema_only", {EMA: e}), ("comparison", {ADAPTER: a, EMA: e})):
        assert adapter_variants(config.model_copy(update={"ema_validation": mode}), a, e) == expected
    assert adapter_variants(config.model_copy(update={"use_ema": False}), a, e) == {ADAPTER: a}
    assert adapter_variants(config, a, None) == {ADAPTER: a}  # no EMA file: the live adapter, with a warning


def test_prompt_file_is_found_beside_the_config_or_reported(make_config, tmp_path):
    with pytest.raises(ConfigError, match="'--validation_prompt_file': file 'nowhere.txt' not found"):
        make_config(validation_prompt_file="nowhere.txt")


def test_relay_validate_cli_on_a_folder_and_an_adapter_file(run, tmp_path):
    from orchestrator.cli import main

    path, checkpoint, _ = run
    common = ["--config", str(path), "--set", "validation_resolution=32x32", "--set", "evaluation_type=none"]
    assert main(["validate", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "a"), *common]) == 0
    summary = json.loads((tmp_path / "a" / SCORES).read_text())
    assert summary["step"] == 4 and summary["variants"] == [BASE, ADAPTER, EMA]  # disable_benchmark false: base too
    assert (tmp_path / "a" / "ema-validation-seed7-32x32.png").is_file()

    exported = next((checkpoint.parent).glob("sd35-*-lokr.safetensors"))
    assert main(["validate", "--checkpoint", str(exported), "--out", str(tmp_path / "b"), *common]) == 0
    assert json.loads((tmp_path / "b" / SCORES).read_text())["variants"] == [BASE, ADAPTER]
    assert main(["validate", "--checkpoint", str(tmp_path / "missing"), *common]) == 2


def test_a_foreign_adapter_builds_its_network_from_the_weights_and_renders_the_same(run, caplog):
    """Tensors that do not fit the configured LyCORIS preset (as a file trained elsewhere, without our
    metadata) go through create_lycoris_from_weights; the same tensors render the same image either way."""
    from safetensors.torch import load_file

    _, checkpoint, validator = run
    weights = load_file(str(checkpoint / ckpt.ADAPTER))
    config = validator.config
    small = config.model_copy(update={"validation_resolution": "32x32"})
    other = config.lycoris.model_copy(update={"apply_preset": {"target_module": ["FeedForward"]}})
    try:
        validator.config = small
        ours = validator.render({ADAPTER: weights}, step=4)
        validator.config = small.model_copy(update={"lycoris": other})
        foreign = validator.render({ADAPTER: weights}, step=4)
        assert "building the network from the weights" in caplog.text
    finally:
        validator.config = config
    for a, b in zip(ours.images, foreign.images):
        assert np.array_equal(pixels(a.image), pixels(b.image))
