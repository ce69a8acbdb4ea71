"""The trainer end to end on the tiny SD3 pipeline, on the CPU."""

from __future__ import annotations

import json

import pytest
import torch

from relay_train import checkpoint as ckpt
from relay_train.model import ModelNotFoundError, build_adapter_model, resolve_model_path
from relay_train.trainer import Hooks, build_trainer
from state_equal import assert_tree_equal  # tests/ is on sys.path (conftest rootdir)

SHORT = dict(checkpointing_steps=4, lr_warmup_steps=2, ema_update_interval=2, train_batch_size=2)


@pytest.mark.parametrize("optimizer", ["bnb-adamw8bit", "adamw"])
def test_resume_is_bitwise_identical(make_config, optimizer):
    n = 12
    common = dict(SHORT, max_train_steps=n, optimizer=optimizer, gradient_accumulation_steps=2)
    straight = build_trainer(make_config(out="straight", **common))
    assert straight.fit().step == n

    config = make_config(out="halves", **common)
    first = build_trainer(config, hooks=Hooks(should_stop=lambda step: step == n // 2))
    result = first.fit()
    assert result.stopped_early and result.step == n // 2
    assert result.last_checkpoint.name == f"checkpoint-{n // 2}"
    del first

    resumed = build_trainer(config)  # resume_from_checkpoint: latest
    assert resumed.step == n // 2
    assert resumed.fit().step == n

    assert_tree_equal(straight.model.network.state_dict(), resumed.model.network.state_dict(), "adapter")
    assert_tree_equal(straight.ema.state_dict(), resumed.ema.state_dict(), "ema")
    assert_tree_equal(straight.optimizer.state_dict(), resumed.optimizer.state_dict(), "optimizer")
    assert_tree_equal(straight.scheduler.state_dict(), resumed.scheduler.state_dict(), "scheduler")
    assert straight.generator.get_state().equal(resumed.generator.get_state())


def test_checkpoint_contents_and_pruning(make_config):
    config = make_config(**SHORT, max_train_steps=20, checkpoints_total_limit=3)
    trainer = build_trainer(config)
    trainer.fit()
    folders = sorted(p.name for p in config.output_dir.glob("checkpoint-*"))
    assert folders == ["checkpoint-12", "checkpoint-16", "checkpoint-20"]
    latest = config.output_dir / "checkpoint-20"
    manifest = ckpt.verify_checkpoint(latest)
    assert set(manifest["files"]) == {
        "adapter.safetensors",
        "adapter_ema.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pt",
        "training_state.json",
        "config.json",
    }
    state = json.loads((latest / "training_state.json").read_text())
    assert state["step"] == 20 and state["world_size"] == 1
    assert {"epoch", "position", "start", "seed", "batch_size"} <= set(state["sampler"])
    saved_config = json.loads((latest / "config.json").read_text())
    assert saved_config["max_train_steps"] == 20 and saved_config["lycoris"]["algo"] == "lokr"
    payload = ckpt.read_checkpoint(latest)
    assert payload.adapter_metadata["step"] == "20"
    assert json.loads(payload.adapter_metadata["lycoris_config"])["algo"] == "lokr"
    assert all(k.startswith("lycoris_") for k in payload.adapter)


def test_explicit_resume_path_must_be_complete(make_config):
    config = make_config(**SHORT, max_train_steps=4)
    build_trainer(config).fit()
    broken = config.output_dir / "checkpoint-4"
    (broken / "manifest.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match="manifest"):
        build_trainer(make_config(**SHORT, max_train_steps=8, resume_from_checkpoint=str(broken)))
    # latest: the only checkpoint is broken, so starting over would silently replace it: refused
    with pytest.raises(ckpt.CheckpointError, match=r"none can be resumed:\n  - checkpoint-4: no manifest"):
        build_trainer(make_config(**SHORT, max_train_steps=8))
    fresh = build_trainer(make_config(**SHORT, max_train_steps=8, resume_from_checkpoint="none"))
    assert fresh.step == 0


def test_only_the_adapter_trains_on_an_int8_base(make_config, tiny_model):
    from optimum.quanto import QLinear, qint8

    trainer = build_trainer(make_config(**SHORT, max_train_steps=1))
    transformer = trainer.model.transformer
    attn = transformer.transformer_blocks[0].attn
    for linear in (attn.to_q, attn.to_k, attn.add_q_proj, transformer.transformer_blocks[0].ff.net[2]):
        assert isinstance(linear, QLinear) and linear.weight.qtype == qint8
        assert linear.weight._data.dtype == torch.int8
    for kept in (transformer.proj_out, transformer.context_embedder, transformer.norm_out.linear):
        assert type(kept) is torch.nn.Linear and kept.weight.dtype == torch.float32
    trainer.fit()
    assert all(p.grad is None and not p.requires_grad for p in transformer.parameters())
    adapter = list(trainer.model.network.parameters())
    assert adapter and all(p.requires_grad for p in adapter)
    # the optimizer holds exactly the adapter's parameters
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == {id(p) for p in adapter}


def test_exported_adapter_reloads_through_lycoris(make_config, tiny_model):
    import lycoris
    from safetensors.torch import load_file

    config = make_config(**SHORT, max_train_steps=8, adapter_export_dtype="fp32")  # bitwise: keep fp32
    trainer = build_trainer(config)
    result = trainer.fit()
    plain, ema = result.exported
    assert plain.name == "sd35-out-lokr.safetensors" and ema.name == "sd35-out-lokr-ema.safetensors"

    gen = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 16, 8, 8, generator=gen),
        encoder_hidden_states=torch.randn(1, 231, 64, generator=gen),
        pooled_projections=torch.randn(1, 64, generator=gen),
        timestep=torch.tensor([700.0]),
        return_dict=False,
    )
    trainer.model.transformer.eval()
    with torch.no_grad():
        expected = trainer.model.transformer(**inputs)[0]

    fresh = build_adapter_model(make_config(**SHORT, max_train_steps=8, out="fresh"), tiny_model, torch.device("cpu"), seed=123)
    fresh.network.restore()  # take our adapter off: a bare int8 transformer
    network, weights = lycoris.create_lycoris_from_weights(1.0, str(plain), fresh.transformer)
    network.apply_to()
    network.load_state_dict(weights)
    fresh.transformer.eval()
    with torch.no_grad():
        got = fresh.transformer(**inputs)[0]
    assert torch.equal(got, expected)
    assert load_file(str(ema)).keys() == weights.keys()


def test_init_lora_continues_from_an_export(make_config):
    first = build_trainer(make_config(**SHORT, max_train_steps=4, out="first", adapter_export_dtype="fp32"))
    exported = first.fit().exported[0]
    # init_lora_step 0: train it anew (unset, the run would continue from the file's step 4, i.e. be done)
    second = build_trainer(make_config(**SHORT, max_train_steps=4, out="second", init_lora=str(exported), init_lora_step=0))
    for name, tensor in first.model.network.state_dict().items():
        assert torch.equal(second.model.network.state_dict()[name], tensor)


def _fixed_draw_loss(trainer, draws: int = 16) -> float:
    """The flow-matching loss on the training image under the same 16 (noise, sigma) draws each call."""
    from relay_train.step import train_step

    bucket = next(iter(trainer.dataset.buckets))
    batch = trainer.dataset.batch(bucket, [0])
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        losses = [
            train_step(
                trainer.model.transformer,
                batch,
                trainer.empty_prompt,
                generator,
                shift=3.0,
                caption_dropout=0.0,
                device=trainer.device,
                dtype=torch.float32,
            )
            for _ in range(draws)
        ]
    return torch.stack(losses).mean().item()


def test_loss_falls_when_overfitting_one_image(make_config, demo_data, tmp_path):
    """A real learning signal: the tiny random model's loss starts near Var(noise) + Var(x0) ≈ 4 and the
    adapter alone (int8 base frozen) pulls it down, both in training and under fixed draws."""
    one = tmp_path / "one"
    one.mkdir()
    for suffix in (".png", ".txt"):
        (one / f"0000{suffix}").write_bytes((demo_data / f"0000{suffix}").read_bytes())
    config = make_config(
        data_dir=one,
        max_train_steps=200,
        train_batch_size=1,
        checkpointing_steps=1000,
        optimizer="adamw",
        learning_rate=1e-2,
        lr_warmup_steps=10,
        caption_dropout_probability=0.0,
        max_grad_norm=1.0,
        grad_clip_method="norm",
    )
    trainer = build_trainer(config)
    before = _fixed_draw_loss(trainer)
    losses = trainer.fit().losses  # one mean per 10 steps
    after = _fixed_draw_loss(trainer)
    head, tail = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    print(f"overfit one image: training windows {head:.3f} → {tail:.3f}, fixed draws {before:.3f} → {after:.3f}")
    assert len(losses) == 20
    assert tail < 0.92 * head, f"training loss did not fall: first windows {losses[:3]}, last {losses[-3:]}"
    assert after < 0.92 * before, f"fixed-draw loss did not fall: {before:.4f} → {after:.4f}"


def test_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE.*hf download"):
        resolve_model_path("stabilityai/stable-diffusion-3.5-medium")
    with pytest.raises(ModelNotFoundError, match="no model folder"):
        resolve_model_path(str(tmp_path / "missing"))
