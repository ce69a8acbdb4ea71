"""SimpleTuner's own SD3 example configs train here, and adapters pass between the two tools, on the CPU
with the tiny SD3 pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from relay_train.config import ConfigError, load_config
from relay_train.demo.recipe import write_backends
from relay_train.model import build_adapter_model
from relay_train.trainer import build_trainer
from simpletuner_wheel import example_files  # tests/ is on sys.path (conftest rootdir)

REPO = Path(__file__).resolve().parents[2]


def sd3_examples() -> dict[str, dict]:
    found = {}
    for name, data in example_files("/config.json").items():
        try:
            raw = json.loads(data)
        except ValueError:
            continue
        if raw.get("model_family") == "sd3":
            found[name.split("/")[0]] = raw
    return found


def with_tiny_paths(raw: dict, tiny_model: Path, demo_data: Path, tmp_path: Path, lycoris: Path) -> dict:
    """The example with only its model and data swapped for the tiny ones (and its length cut to 2
    steps): lora_type standard becomes lycoris, with SimpleTuner's example LyCORIS config."""
    backends = write_backends(tmp_path / "backends.json", demo_data, tmp_path / "cache")
    swapped = {
        **raw,
        "pretrained_model_name_or_path": str(tiny_model),
        "data_backend_config": str(backends),
        "output_dir": str(tmp_path / "out"),
        "resolution": 64,
        "max_train_steps": 2,
    }
    if swapped.get("lora_type") == "standard":
        swapped.update(lora_type="lycoris", lycoris_config=str(lycoris))
    return swapped


def test_simpletuners_sd3_examples_train_two_steps(tiny_model, demo_data, tmp_path):
    examples = sd3_examples()
    assert len(examples) >= 2
    lycoris = tmp_path / "lycoris_config.json"
    lycoris.write_bytes(example_files("examples/lycoris_config.json")["lycoris_config.json"])
    trained, refused = [], {}
    for name, raw in sorted(examples.items()):
        folder = tmp_path / name
        folder.mkdir()
        path = folder / "config.json"
        path.write_text(json.dumps(with_tiny_paths(raw, tiny_model, demo_data, folder, lycoris)))
        try:
            config = load_config(path)
        except ConfigError as exc:
            refused[name] = exc.problems
            continue
        assert config.optimizer == raw["optimizer"] and config.checkpoint_step_interval == raw["checkpoint_step_interval"]
        result = build_trainer(config).fit()
        assert result.step == 2 and len(result.exported) == 1
        trained.append(name)
    assert trained == ["sd3.peft-lora"]
    # The ControlNet example trains a ControlNet, which Relay does not: refused at once, by its ControlNet
    # and evaluation options only, each in one line that says so.
    assert list(refused) == ["sd3.peft-controlnet-lora"]
    assert sorted(p.split("'")[1] for p in refused["sd3.peft-controlnet-lora"]) == ["controlnet", "num_eval_images"]
    assert all(" is not supported by Terminus Relay: " in p for p in refused["sd3.peft-controlnet-lora"])


def simpletuner_adapter(network: torch.nn.Module, path: Path, step: int, lycoris: dict) -> dict[str, torch.Tensor]:
    """An adapter laid out as SimpleTuner writes one: LyCORIS names, bf16 tensors, alpha 9984 (bf16's
    10000), a trimmed lycoris_config and global_step in the metadata."""
    generator = torch.Generator().manual_seed(7)
    tensors = {}
    for key, value in network.state_dict().items():
        assert key.startswith("lycoris_") and key.rsplit(".", 1)[1] in ("alpha", "lokr_w1", "lokr_w2"), key
        filled = (
            torch.full_like(value, 10000.0) if key.endswith(".alpha") else torch.randn(value.shape, generator=generator) * 0.01
        )
        tensors[key] = filled.to(torch.bfloat16)
    trimmed = {
        k: lycoris[k]
        for k in ("algo", "multiplier", "linear_dim", "linear_alpha", "factor", "full_matrix", "bypass_mode", "apply_preset")
    }
    save_file(
        tensors,
        str(path),
        metadata={
            "lycoris_config": json.dumps(trimmed),
            "global_step": str(step),
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.implementation": "diffusers",
        },
    )
    alphas = {v.float().unique().item() for k, v in tensors.items() if k.endswith(".alpha")}
    assert alphas == {9984.0}
    return tensors


def test_init_lora_continues_from_a_simpletuner_adapter(config_file, tmp_path):
    lycoris = json.loads((REPO / "configs/demo/lycoris_config.json").read_text())
    probe = load_config(config_file(out="probe", max_train_steps=1))  # the same LyCORIS network, no data work
    network = build_adapter_model(probe, Path(probe.pretrained_model_name_or_path), torch.device("cpu"), seed=0).network
    adapter = tmp_path / "simpletuner-lokr.safetensors"
    written = simpletuner_adapter(network, adapter, step=3, lycoris=lycoris)

    config = load_config(
        config_file(out="continued", max_train_steps=5, checkpointing_steps=5, use_ema=False, init_lora=str(adapter))
    )
    trainer = build_trainer(config)
    first_weights = {k: v.detach().clone() for k, v in trainer.model.network.state_dict().items()}  # step 1's
    assert trainer.step == 3  # SimpleTuner's global_step metadata
    for key, value in written.items():
        assert torch.equal(first_weights[key], value.float()), key
    result = trainer.fit()
    assert result.step == 5
    exported = result.exported[0]
    with safe_open(str(exported), framework="pt") as fh:
        metadata = fh.metadata()
        dtypes = {fh.get_tensor(k).dtype for k in fh.keys()}
    assert dtypes == {torch.bfloat16}  # mixed_precision bf16: the dtype SimpleTuner writes
    assert metadata["global_step"] == metadata["step"] == "5"
    assert json.loads(metadata["lycoris_config"]) == lycoris
    assert metadata["base_model"] == Path(config.pretrained_model_name_or_path).name  # never a local path
    assert not metadata["base_model"].startswith("/")


def test_our_export_loads_with_lycoris_and_as_simpletuners_init_lora(config_file, tiny_model):
    """SimpleTuner's init_lora path: create_lycoris_from_weights on the transformer with the file's tensors."""
    from lycoris import create_lycoris_from_weights

    from relay_train.model import load_transformer

    config = load_config(
        config_file(out="export", max_train_steps=2, checkpointing_steps=2, use_ema=False, adapter_export_dtype="fp32")
    )
    trainer = build_trainer(config)
    exported = trainer.fit().exported[0]
    state = load_file(str(exported))
    assert {v.dtype for v in state.values()} == {torch.float32}  # adapter_export_dtype fp32 keeps them
    transformer = load_transformer(tiny_model, torch.float32)
    network, _ = create_lycoris_from_weights(1.0, str(exported), transformer)
    # The network keeps its modules in a plain list: read each module's tensors under its LyCORIS name.
    loaded = {f"{lora.lora_name}.{name}": t for lora in network.loras for name, t in lora.state_dict().items()}
    assert set(loaded) == set(state)
    for key, value in state.items():
        if not key.endswith(".alpha"):  # a full-matrix LoKr's scale is 1 whatever alpha says: compared below
            assert torch.equal(loaded[key].float(), value), key
    ours = {lora.lora_name: lora.scale for lora in trainer.model.network.loras}
    assert {lora.lora_name: lora.scale for lora in network.loras} == ours
