"""SimpleTuner 4.x compatibility of the config reader: its key names and aliases, its defaults (checked
against its own field registry in the 4.10.1 wheel), the options Relay refuses and how, and bad values."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from relay_train.config import compat
from relay_train.config import USER_KEYS, ConfigError, TrainConfig, load_config
from relay_train.config.overrides import config_overrides, flag_pairs
from simpletuner_wheel import example_files, registry_defaults, registry_source  # tests/ is on sys.path (conftest rootdir)

SECRET_URL = "https://discord.com/api/webhooks/123456/s3cr3t-t0ken-do-not-leak"
# Where SimpleTuner has no default or another spelling of the same one.
SAME_EFFECT = {"max_train_steps": (None, 0), "minimum_image_size": (None, 0), "data_backend_config": (None, None)}


def minimal(**extra: object) -> dict[str, object]:
    return {
        "pretrained_model_name_or_path": "demo/tiny-sd3",
        "lycoris_config": "config/run/lycoris_config.json",
        "data_backend_config": "config/run/multidatabackend.json",
        "max_train_steps": 10,
        **extra,
    }


def written(workdir: Path, name: str) -> Any:
    """A file the workdir fixture wrote in configs/run/, as JSON."""
    return json.loads((workdir / "configs" / "run" / name).read_text())


def write(workdir: Path, raw: dict[str, object] | str) -> Path:
    path = workdir / "configs" / "run" / "config.json"
    path.write_text(raw if isinstance(raw, str) else json.dumps(raw))
    return path


def problems_of(workdir: Path, raw: dict[str, object] | str, overrides: dict | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(write(workdir, raw), overrides)
    return info.value.problems


# ---------------------------------------------------------------- against SimpleTuner's own registry


def test_defaults_equal_simpletuner_4_10_1_or_differ_on_record() -> None:
    theirs = registry_defaults()
    assert len(theirs) > 400  # the registry was read, not an empty file list
    checked = 0
    for key in USER_KEYS:
        if key not in theirs:
            continue  # a Relay-only key (validation actors, Hub mirror, ...)
        ours, (default, _) = TrainConfig.model_fields[key].default, theirs[key]
        ours = None if ours is ... or repr(ours) == "PydanticUndefined" else ours
        if key in compat.DEFAULT_DIFFERENCES:
            assert str(ours) != str(default), f"{key}: listed as a difference but equal ({default!r})"
        elif key in SAME_EFFECT:
            assert (default, ours) == SAME_EFFECT[key], key
        else:
            ours = str(ours) if isinstance(ours, Path) else ours
            assert ours == default, f"{key}: Relay {ours!r}, SimpleTuner 4.10.1 {default!r}"
            checked += 1
    assert checked >= 60


def test_legacy_aliases_are_simpletuners() -> None:
    theirs = registry_defaults()
    for key, (_, aliases) in theirs.items():
        if key in USER_KEYS:
            for alias in aliases:
                assert compat.KEY_ALIASES.get(alias) == key, f"SimpleTuner's alias {alias} of {key}"
    ours_only = {"flux_schedule_shift", "save_total_limit"}  # the model card's spelling; cli_utils' legacy key
    for alias, key in compat.KEY_ALIASES.items():
        assert alias in ours_only or alias in theirs[key][1], alias
    # every refused option is a real SimpleTuner option (a stale name would refuse a typo with a wrong story)
    legacy = {
        "use_8bit_adam",
        "use_prodigy_optimizer",
        "use_adafactor_optimizer",
        "adam_bfloat16",
        "weighting_scheme",
        "ignore_final_epochs",
    }
    source = registry_source()  # names registered in a loop (text_encoder_{i}_precision) are not literals
    unknown = sorted(
        k
        for k in compat.REFUSED
        if k not in theirs and k not in legacy and f'"{k}"' not in source and k.rsplit("_", 2)[0] + "_{" not in source
    )
    assert unknown == []


def test_every_simpletuner_option_is_implemented_aliased_or_refused() -> None:
    theirs = registry_defaults()
    loose = sorted(k for k in theirs if k not in USER_KEYS and k not in compat.KEY_ALIASES and not compat.refused_group(k))
    assert loose == []  # none would meet a bare "unknown key", or a suggestion of another key
    assert not [k for k in USER_KEYS if compat.refused_group(k)]


# ---------------------------------------------------------------- names


def test_current_and_legacy_names_resolve_to_one_canonical_key(workdir: Path) -> None:
    legacy = load_config(
        write(
            workdir,
            minimal(
                checkpointing_steps=7,
                validation_steps=3,
                save_total_limit=2,
                vae_cache_preprocess=False,
                validation_prompt="a cat",
            ),
        )
    )
    current = load_config(
        write(
            workdir,
            minimal(
                checkpoint_step_interval=7,
                validation_step_interval=3,
                checkpoints_total_limit=2,
                vae_cache_ondemand=True,
                validation_prompt="a cat",
            ),
        )
    )
    assert legacy.resolved_dict() | {"source_path": None} == current.resolved_dict() | {"source_path": None}
    resolved = legacy.resolved_dict()
    assert resolved["checkpoint_step_interval"] == 7 and resolved["validation_step_interval"] == 3
    assert not {"checkpointing_steps", "validation_steps", "save_total_limit", "vae_cache_preprocess"} & set(resolved)
    assert legacy.checkpointing_steps == 7 and legacy.validation_every == 3  # what the loop reads
    assert not hasattr(legacy, "validation_steps")  # only the config key's legacy name, never a second meaning
    notes = "\n".join(legacy.mapping_notes())
    assert "'checkpointing_steps' is read as '--checkpoint_step_interval'" in notes
    assert "'vae_cache_preprocess' is read as '--vae_cache_ondemand'" in notes


def test_a_value_alias_and_the_conflict_of_two_spellings(workdir: Path) -> None:
    config = load_config(write(workdir, minimal(lr_scheduler="cosine_with_warmup", optimizer="adam_bfloat16")))
    assert (config.lr_scheduler, config.optimizer) == ("cosine", "adamw_bf16")
    problems = problems_of(workdir, minimal(checkpointing_steps=5, checkpoint_step_interval=6))
    assert problems == [
        "'checkpointing_steps' and 'checkpoint_step_interval' both set '--checkpoint_step_interval', "
        "to 5 and 6: keep only '--checkpoint_step_interval'"
    ]


def test_validation_disable_and_no_prompt_turn_validation_off(workdir: Path) -> None:
    assert load_config(write(workdir, minimal(validation_prompt="a cat"))).validation_every == 100  # SimpleTuner's
    assert load_config(write(workdir, minimal(validation_prompt="a cat", validation_disable=True))).validation_every == 0
    assert load_config(write(workdir, minimal())).validation_every == 0  # nothing to render


def test_the_start_up_note_says_the_validation_cadence_when_checkpoints_set_it(workdir: Path) -> None:
    defaults = load_config(write(workdir, minimal(validation_prompt="a cat")))  # 500 and 100
    assert (defaults.validation_every, defaults.validation_cadence) == (100, 500)
    assert (
        "validation renders committed checkpoints only: with --checkpoint_step_interval=500 and "
        "--validation_step_interval=100 it runs every 500 steps"
    ) in "\n".join(defaults.mapping_notes())
    odd = load_config(write(workdir, minimal(validation_prompt="a cat", checkpoint_step_interval=4, validation_step_interval=6)))
    assert odd.validation_cadence == 12 and "it runs every 12 steps" in "\n".join(odd.mapping_notes())
    aligned = load_config(
        write(workdir, minimal(validation_prompt="a cat", checkpoint_step_interval=50, validation_step_interval=100))
    )
    assert aligned.validation_cadence == 100 and "validation renders" not in "\n".join(aligned.mapping_notes())
    off = load_config(write(workdir, minimal()))
    assert off.validation_cadence == 0 and "validation renders" not in "\n".join(off.mapping_notes())


# ---------------------------------------------------------------- refusals and suggestions


def test_refused_options_say_so_without_a_near_miss(workdir: Path) -> None:
    problems = problems_of(
        workdir,
        minimal(ema_device="cpu", num_validation_images=4, controlnet=True, attention_mechanism="sageattention", snr_gamma=5.0),
    )
    assert len(problems) == 5
    for key in ("ema_device", "num_validation_images", "controlnet", "attention_mechanism", "snr_gamma"):
        line = next(p for p in problems if f"'{key}'" in p)
        assert line.startswith(f"SimpleTuner option '{key}' is not supported by Terminus Relay: "), line
        assert "did you mean" not in line


def test_a_refused_option_set_to_what_relay_does_is_accepted(workdir: Path) -> None:
    config = load_config(
        write(
            workdir,
            minimal(
                controlnet=False,
                num_validation_images=1,
                validation_disable_unconditional="true",
                attention_mechanism="diffusers",
            ),
        )
    )
    notes = "\n".join(config.mapping_notes())
    assert "'--controlnet=false' is what Relay does anyway" in notes
    assert "'--num_validation_images=1'" in notes


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("lora_type", "standard"),
        ("model_type", "full"),
        ("mixed_precision", "fp16"),
        ("base_model_precision", "int8-torchao"),
        ("lr_scheduler", "sine"),
        ("report_to", "tensorboard"),
    ],
)
def test_refused_values_name_the_alternative(workdir: Path, key: str, value: str) -> None:
    [line] = problems_of(workdir, minimal(**{key: value}))
    assert line.startswith(f"SimpleTuner option '{key}'={value!r} is not supported by Terminus Relay: ")


def test_another_model_family_is_refused_in_one_line(workdir: Path) -> None:
    problems = problems_of(
        workdir,
        {
            "model_family": "flux",
            "flux_guidance_value": 1.0,
            "lora_type": "standard",
            "data_backend_config": "nowhere.json",
            "learning_rate": "lots",
        },
    )
    assert problems == [
        "SimpleTuner model family 'flux' is not supported by Terminus Relay: "
        "it trains Stable Diffusion 3.x (model_family sd3) LyCORIS adapters only"
    ]


def test_typo_suggestions_point_at_keys_of_the_same_kind(workdir: Path) -> None:
    problems = problems_of(
        workdir,
        minimal(**{"--learning_rat": 1e-4, "--ema_deca": "cpu", "--validation_num_gpu": 2, "--gradient_checkpoint": True}),
    )
    assert "unknown key '--learning_rat': did you mean '--learning_rate'?" in problems
    assert "unknown key '--gradient_checkpoint': did you mean '--gradient_checkpointing'?" in problems
    assert "unknown key '--ema_deca': not a recognised option" in problems  # 'cpu' is no decay rate
    assert "unknown key '--validation_num_gpu': did you mean '--validation_num_gpus'?" in problems


# ---------------------------------------------------------------- bad numbers and files


def test_non_finite_and_absurd_numbers_are_refused(workdir: Path) -> None:
    raw = minimal(
        learning_rate=math.inf,
        flow_schedule_shift=math.inf,
        lr_end=math.nan,
        max_grad_norm=math.inf,
        validation_guidance=1e30,
        ema_decay=math.nan,
        minimum_image_size=math.inf,
    )
    problems = problems_of(workdir, json.dumps(raw))  # json writes Infinity and NaN, which json reads back
    for key in (
        "learning_rate",
        "flow_schedule_shift",
        "lr_end",
        "max_grad_norm",
        "validation_guidance",
        "ema_decay",
        "minimum_image_size",
    ):
        assert any(p.startswith(f"'--{key}': got ") for p in problems), key
    assert problems_of(workdir, minimal(learning_rate=1e30)) == ["'--learning_rate': got 1e+30; must be a number > 0 and <= 1"]
    lycoris = {**written(workdir, "lycoris_config.json"), "multiplier": math.inf}
    (workdir / "configs/run/lycoris_config.json").write_text(json.dumps(lycoris))
    assert any(p.startswith("lycoris_config.json.multiplier: got inf") for p in problems_of(workdir, minimal()))


def test_the_lycoris_file_is_checked_as_strictly_as_the_config(workdir: Path) -> None:
    preset = {"target_modules": ["Attention"], "module_algo_map": {"Attention": {"facter": 2}}}
    (workdir / "configs/run/lycoris_config.json").write_text(
        json.dumps({**written(workdir, "lycoris_config.json"), "full_matirx": True, "apply_preset": preset})
    )
    problems = problems_of(workdir, minimal())
    assert problems == [
        "lycoris_config.json: unknown key 'full_matirx': did you mean 'full_matrix'?",
        "lycoris_config.json.apply_preset: unknown key 'target_modules': did you mean 'target_module'?",
        "lycoris_config.json.apply_preset.module_algo_map[Attention]: unknown key 'facter': did you mean 'factor'?",
    ]


@pytest.mark.parametrize(
    "webhook",
    [
        {"webhook_type": "discord", "webhook_url": SECRET_URL, "colour": "red"},
        json.dumps({"webhook_type": "raw", "callback_url": SECRET_URL, "log_level": "loud"}),
        json.dumps([{"webhook_url": SECRET_URL}])[:-3],  # broken inline JSON
    ],
)
def test_no_error_shows_a_webhook_secret(workdir: Path, webhook: object) -> None:
    problems = problems_of(workdir, minimal(webhook_config=webhook, seed="x", webhook_url=SECRET_URL, tracker_run_name=12))
    assert problems and not any("s3cr3t" in p or "123456" in p for p in problems)
    assert any("'--seed'" in p for p in problems)


def test_output_dir_that_is_a_file_or_empty(workdir: Path) -> None:
    (workdir / "a-file").write_text("x")
    [line] = problems_of(workdir, minimal(output_dir="a-file"))
    assert line.startswith("'--output_dir': got 'a-file'; is a file, not a folder")
    [line] = problems_of(workdir, minimal(output_dir=""))
    assert line.startswith("'--output_dir': got ''; is empty")


def test_a_non_utf8_config_file_is_named(workdir: Path) -> None:
    path = workdir / "configs/run/config.json"
    path.write_bytes(b'{"--seed": "\xff\xfe"}')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "not UTF-8" in str(info.value)


# ---------------------------------------------------------------- newly implemented keys


def test_model_flavour_names_or_checks_the_model(workdir: Path) -> None:
    raw = minimal(model_flavour="large")
    del raw["pretrained_model_name_or_path"]
    config = load_config(write(workdir, raw))
    assert config.pretrained_model_name_or_path == "stabilityai/stable-diffusion-3.5-large"
    [line] = problems_of(
        workdir, minimal(model_flavour="large", pretrained_model_name_or_path="stabilityai/stable-diffusion-3.5-medium")
    )
    assert "is an SD3.5 Medium model" in line
    local = workdir / "models" / "mmdit-x"
    (local / "transformer").mkdir(parents=True)
    (local / "transformer" / "config.json").write_text(json.dumps({"dual_attention_layers": [0, 1]}))
    assert load_config(write(workdir, minimal(model_flavour="medium", pretrained_model_name_or_path=str(local))))
    [line] = problems_of(workdir, minimal(model_flavour="large", pretrained_model_name_or_path=str(local)))
    assert "set --model_flavour 'medium'" in line
    [line] = problems_of(workdir, minimal(model_flavour="turbo"))
    assert line.startswith("'--model_flavour': got 'turbo'; expected one of 'medium', 'large'")


def test_cross_key_rules_of_the_new_keys(workdir: Path) -> None:
    problems = problems_of(workdir, minimal(lr_scheduler="polynomial", learning_rate=1e-5, lr_end=1e-4, init_lora_step=3))
    assert any(p.startswith("'--lr_end' (0.0001) must be below '--learning_rate'") for p in problems)
    assert "'--init_lora_step' needs '--init_lora': name the adapter file to continue from" in problems


def test_text_embeds_links_an_image_backend_to_a_text_cache(workdir: Path) -> None:
    images, text = written(workdir, "multidatabackend.json")
    backends = [
        {**images, "text_embeds": "other"},
        text,
        {"id": "other", "dataset_type": "text_embeds", "cache_dir": "cache/other"},
    ]
    (workdir / "configs/run/multidatabackend.json").write_text(json.dumps(backends))
    config = load_config(write(workdir, minimal()))
    assert config.data_backends[0].text_embeds == "other"
    assert any(
        "Relay caches each caption's embeddings once, in the default text_embeds backend 'text'" in n
        for n in config.mapping_notes()
    )
    backends[0]["text_embeds"] = "missing"
    (workdir / "configs/run/multidatabackend.json").write_text(json.dumps(backends))
    assert problems_of(workdir, minimal()) == [
        "multidatabackend.json[images].text_embeds: got 'missing'; it must name an enabled text_embeds backend "
        "(ids: 'text', 'other')"
    ]


def test_relied_on_default_differences_are_logged(workdir: Path) -> None:
    notes = "\n".join(load_config(write(workdir, minimal())).mapping_notes())
    assert "--seed is not set: Relay uses 42 where SimpleTuner 4.10.1 uses none" in notes
    assert "--lora_type is not set" in notes
    assert "--seed is not set" not in "\n".join(load_config(write(workdir, minimal(seed=1))).mapping_notes())


# ---------------------------------------------------------------- the command line


def test_flags_as_simpletuner_takes_them() -> None:
    argv = ["--max_train_steps=10", "--init_lora", "a b.safetensors", "--use_ema", "--lr_end", "1e-6", "--validation_prompt=x=y"]
    assert flag_pairs(argv) == [
        "--max_train_steps=10",
        "--init_lora=a b.safetensors",
        "--use_ema=true",
        "--lr_end=1e-6",
        "--validation_prompt=x=y",
    ]
    assert config_overrides(["seed=3"], argv[:1]) == {"seed": 3, "--max_train_steps": 10}
    with pytest.raises(ConfigError, match="unexpected argument 'stray'"):
        flag_pairs(["stray", "--seed", "1"])


def test_unknown_flags_join_the_config_problems(workdir: Path) -> None:
    overrides = config_overrides([], ["--learning_rat", "1e-4", "--ema_device=cpu", "--seed", "x"])
    problems = problems_of(workdir, minimal(grad_clip_method="clamp"), overrides)
    assert len(problems) == 4
    assert "unknown key '--learning_rat': did you mean '--learning_rate'?" in problems


# ---------------------------------------------------------------- SimpleTuner's example files


def test_every_example_lycoris_config_loads(tmp_path: Path) -> None:
    from relay_train.config.files import load_lycoris

    files = example_files("lycoris_config.json")
    assert len(files) >= 20
    for name, data in files.items():
        path = tmp_path / name.replace("/", "__")
        path.write_bytes(data)
        config, problems = load_lycoris(path)
        assert problems == [] and config is not None, (name, problems)
        assert config.algo == "lokr"


def test_every_other_family_example_is_refused_in_one_line(workdir: Path) -> None:
    refused, not_json = 0, []
    for name, data in example_files("/config.json").items():
        try:
            raw = json.loads(data)
        except ValueError:  # SimpleTuner's own json.load fails on it too (a trailing comma)
            [line] = problems_of(workdir, data.decode())
            assert "not valid JSON at line" in line
            not_json.append(name)
            continue
        family = raw.get("model_family") or raw.get("--model_family")
        if family == "sd3":
            continue
        with pytest.raises(ConfigError) as info:
            load_config(write(workdir, raw))
        assert info.value.problems == [
            f"SimpleTuner model family {family!r} is not supported by Terminus Relay: {compat.FAMILIES_WORDS}"
        ], name
        refused += 1
    assert refused >= 100 and len(not_json) <= 1, not_json


def test_environment_secrets_are_masked_in_config_errors(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_realLookingToken0123456789")
    [line] = problems_of(workdir, minimal(validation_prompt=["hf_realLookingToken0123456789"]))
    assert line.startswith("'--validation_prompt': got ") and "hf_realLookingToken" not in line and "<hidden>" in line
