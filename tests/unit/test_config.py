"""The SimpleTuner-style config: shipped files parse, and every problem is reported at once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.core.cluster import ClusterConfig, load_cluster_config
from relay_train.config import (
    ConfigError,
    LycorisConfig,
    TrainConfig,
    canonical_key,
    load_config,
    parse_config,
)

REPO = Path(__file__).resolve().parents[2]
CARD = Path("/work/shared/seed/terminus-relay-v2-model-card.txt")
SECRET_URL = "https://discord.com/api/webhooks/123456/s3cr3t-t0ken-do-not-leak"


@pytest.fixture
def in_repo(monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(REPO)
    return REPO


def minimal(**extra: object) -> dict[str, object]:
    return {
        "--pretrained_model_name_or_path": "demo/tiny-sd3",
        "--lycoris_config": "config/run/lycoris_config.json",
        "--data_backend_config": "config/run/multidatabackend.json",
        "--max_train_steps": 10,
        **extra,
    }


def write_config(workdir: Path, raw: dict[str, object]) -> Path:
    path = workdir / "configs" / "run" / "config.json"
    path.write_text(json.dumps(raw))
    return path.relative_to(workdir)


def problems_of(raw: dict[str, object], workdir: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(write_config(workdir, raw))
    assert str(info.value).count("\n") == len(info.value.problems)
    return info.value.problems


# ---------------------------------------------------------------- shipped configs


@pytest.mark.parametrize("name", ["sd3", "demo"])
def test_shipped_config_parses(in_repo: Path, name: str) -> None:
    config = load_config(f"configs/{name}/config.json")
    assert config.lycoris is not None and config.lycoris.algo == "lokr"
    assert config.data_backends
    assert json.loads(config.resolved_json())["pretrained_model_name_or_path"]


def test_every_file_in_configs_is_read(in_repo: Path) -> None:
    read: set[Path] = set()
    for path in sorted((in_repo / "configs").glob("*/config.json")):
        config = load_config(path.relative_to(in_repo))
        read.add(path)
        read |= {
            (in_repo / p).resolve()
            for p in (config.lycoris_config, config.data_backend_config, config.webhook_config)
            if p is not None
        }
    for path in sorted((in_repo / "configs").glob("*/cluster.json")):  # the orchestrator's section
        load_cluster_config(path)
        read.add(path)
    assert set((in_repo / "configs").rglob("*.json")) == read


def test_sd3_config_consumes_every_model_card_key(in_repo: Path) -> None:
    raw = json.loads(Path("configs/sd3/config.json").read_text())
    config = load_config("configs/sd3/config.json")
    for key in raw:
        name = canonical_key(key)
        assert name is not None, key
        assert name in config.model_fields_set, key
    assert config.learning_rate == 5e-5 and config.push_to_hub is True
    assert config.validation_num_inference_steps == 30 and config.validation_guidance_rescale == 0.0
    assert config.gradient_checkpointing is True and config.compress_disk_cache is False
    assert config.delete_problematic_images is True and config.skip_file_discovery == ""
    assert config.flow_schedule_shift == 3.0 and config.use_ema and config.ema_update_interval == 25
    assert config.validation_resolutions == [(1024, 1024)]
    assert [h.webhook_type for h in config.webhook] == ["discord"]


def test_sd3_config_is_the_model_card_verbatim(in_repo: Path) -> None:
    if not CARD.is_file():
        pytest.skip("model card not available here")
    card = CARD.read_text()
    block = card[card.index("{", card.index("config/sd3/config.json")) :]
    card_raw, _ = json.JSONDecoder().raw_decode(block)
    shipped = json.loads(Path("configs/sd3/config.json").read_text())
    assert list(shipped.items()) == list(card_raw.items())


def test_lycoris_file_loads_verbatim(in_repo: Path) -> None:
    config = load_config("configs/sd3/config.json")
    file_dict = json.loads(Path("configs/sd3/lycoris_config.json").read_text())
    assert config.lycoris is not None
    assert config.lycoris.raw() == file_dict
    assert config.lycoris.create_kwargs() == {"algo": "lokr", "factor": 4, "full_matrix": True, "bypass_mode": True}
    assert config.lycoris.apply_preset["module_algo_map"]["Attention"] == {"factor": 2}


def test_lycoris_extra_keys_pass_through() -> None:
    lyco = LycorisConfig.model_validate({"algo": "lokr", "linear_dim": 8, "dropout": 0.05, "use_tucker": False})
    assert lyco.create_kwargs()["dropout"] == 0.05 and "linear_dim" not in lyco.create_kwargs()


def test_conf_name_resolves_to_json_file(workdir: Path) -> None:
    config = load_config(write_config(workdir, minimal(**{"--lycoris_config": "config/run/lycoris_config.conf"})))
    assert config.lycoris_config == Path("configs/run/lycoris_config.json")


def test_path_as_given_from_cwd_wins(workdir: Path) -> None:
    config = load_config(write_config(workdir, minimal(**{"--data_backend_config": "configs/run/multidatabackend.json"})))
    assert config.data_backend_config == Path("configs/run/multidatabackend.json")
    assert config.output_dir == Path("output")


# ---------------------------------------------------------------- loud errors


def test_unknown_keys_are_reported_together_with_suggestions(workdir: Path) -> None:
    problems = problems_of(
        minimal(
            **{"--learning_rat": 1e-4, "--gradient_checkpoint": True, "use_emaa": True, "--flux_schedule_shif": 3, "--zzz": 1}
        ),
        workdir,
    )
    assert problems == [
        "unknown key '--learning_rat': did you mean '--learning_rate'?",
        "unknown key '--gradient_checkpoint': did you mean '--gradient_checkpointing'?",
        "unknown key 'use_emaa': did you mean 'use_ema'?",
        "unknown key '--flux_schedule_shif': did you mean '--flow_schedule_shift'?",
        "unknown key '--zzz': not a recognised option",
    ]


def test_wrong_types_and_impossible_values_are_reported_together(workdir: Path) -> None:
    problems = problems_of(
        minimal(
            **{
                "--grad_clip_method": "clip",
                "--checkpointing_steps": 0,
                "--train_batch_size": "two",
                "--caption_dropout_probability": 1.5,
                "--learning_rate": True,
                "--use_ema": "maybe",
                "--validation_resolution": "1000x1024",
                "--skip_file_discovery": "vae foo",
                "--checkpoints_total_limit": 0,
                "--max_train_steps": -1,
            }
        ),
        workdir,
    )
    expected = [
        "'--grad_clip_method': got 'clip'; expected one of 'value', 'norm'",
        "'--checkpointing_steps': got 0; must be an integer >= 1",
        "'--train_batch_size': got 'two'; must be an integer >= 1",
        "'--caption_dropout_probability': got 1.5; must be a number >= 0 and <= 1",
        "'--learning_rate': got True; must be a number > 0 and <= 1",
        "'--use_ema': got 'maybe'; expected true or false",
        "'--checkpoints_total_limit': got 0; must be an integer >= 1 (or null)",
        "'--max_train_steps': got -1; must be an integer >= 0",
    ]
    for line in expected:
        assert line in problems
    assert any(p.startswith("'--validation_resolution': got '1000x1024'") and "16" in p for p in problems)
    assert any(p.startswith("'--skip_file_discovery'") and "'foo'" in p for p in problems)
    assert len(problems) == 10


def test_cross_field_problems_join_the_same_error(workdir: Path) -> None:
    # num_train_epochs and lycoris_config have SimpleTuner's defaults (1, config/lycoris_config.json): unset them
    raw = minimal(
        **{"--max_train_steps": 0, "--num_train_epochs": 0, "--push_to_hub": True, "--seed": "x", "--lycoris_config": None}
    )
    problems = problems_of(raw, workdir)
    assert "'--seed': got 'x'; must be an integer" in problems
    assert any("'--max_train_steps' and '--num_train_epochs' are both 0" in p for p in problems)
    assert any(p.startswith("'--lycoris_config' is required") for p in problems)
    assert any("'--push_to_hub' is true but '--hub_model_id'" in p for p in problems)


def test_missing_required_keys(workdir: Path) -> None:
    problems = problems_of({"--max_train_steps": 5, "--lycoris_config": "config/run/lycoris_config.json"}, workdir)
    assert [p.split(" (")[0] for p in problems] == [
        "missing required key '--pretrained_model_name_or_path'",
        "missing required key '--data_backend_config'",
    ]


def test_strings_are_read_as_bools_and_numbers(workdir: Path) -> None:
    config = load_config(
        write_config(
            workdir,
            minimal(
                **{
                    "--push_to_hub": "false",
                    "--gradient_checkpointing": "true",
                    "--learning_rate": "5e-5",
                    "--validation_num_inference_steps": "30",
                    "--validation_guidance_rescale": "0.0",
                    "--max_train_steps": "300",
                    "--skip_file_discovery": False,
                    "--resume_from_checkpoint": None,
                }
            ),
        )
    )
    assert config.push_to_hub is False and config.gradient_checkpointing is True
    assert config.learning_rate == 5e-5 and config.validation_num_inference_steps == 30
    assert config.validation_guidance_rescale == 0.0 and config.max_train_steps == 300
    assert config.skip_file_discovery == "" and config.resume_from_checkpoint == "none"


def test_overrides_apply_with_either_spelling(workdir: Path) -> None:
    config = load_config(write_config(workdir, minimal()), {"learning_rate": "1e-5", "--max_train_steps": 7})
    assert config.learning_rate == 1e-5 and config.max_train_steps == 7
    with pytest.raises(ConfigError, match="did you mean '--seed'"):
        load_config(write_config(workdir, minimal()), {"--sed": 1})


def test_flux_schedule_shift_is_read_as_flow(workdir: Path) -> None:
    config = load_config(write_config(workdir, minimal(**{"--flux_schedule_shift": 2})))
    assert config.flow_schedule_shift == 2.0
    assert any("'--flux_schedule_shift' is read as '--flow_schedule_shift'" in n for n in config.mapping_notes())
    same = load_config(write_config(workdir, minimal(**{"--flux_schedule_shift": "3", "--flow_schedule_shift": 3})))
    assert same.flow_schedule_shift == 3.0


def test_conflicting_alias_values_are_a_problem(workdir: Path) -> None:
    problems = problems_of(minimal(**{"--flux_schedule_shift": 3, "--flow_schedule_shift": 2}), workdir)
    assert len(problems) == 1
    assert "'--flux_schedule_shift' and '--flow_schedule_shift'" in problems[0] and "3" in problems[0]


def test_missing_referenced_file_names_the_places_tried(workdir: Path) -> None:
    problems = problems_of(
        minimal(**{"--lycoris_config": "config/sd3/lyco.conf", "--webhook_config": "hooks/webhook.json"}), workdir
    )
    lyco = next(p for p in problems if p.startswith("'--lycoris_config'"))
    for tried in [
        "config/sd3/lyco.conf",
        "config/sd3/lyco.json",
        "configs/run/config/sd3/lyco.conf",
        "configs/run/lyco.conf",
        "configs/run/lyco.json",
    ]:
        assert tried in lyco
    webhook = next(p for p in problems if p.startswith("'--webhook_config'"))  # a secret-bearing key: no value, no place
    assert "not found" in webhook and "webhook.json" not in webhook and "hooks" not in webhook


def test_bad_backend_entries_join_the_same_error(workdir: Path) -> None:
    backends = [
        {"id": "images", "type": "local", "instance_dir": "data", "crop": "sometimes"},
        {"id": "s3", "type": "aws", "resolution": -1},
        {"id": "s3", "type": "local", "instance_data_dir": "x"},
        {"id": "t1", "dataset_type": "text_embeds", "default": True},
        {"id": "t2", "dataset_type": "text_embeds", "default": True},
        "not an object",
    ]
    (workdir / "configs/run/multidatabackend.json").write_text(json.dumps(backends))
    problems = problems_of(minimal(**{"--seed": "x"}), workdir)
    expected = [
        "'--seed': got 'x'; must be an integer",
        "multidatabackend.json[images]: unknown key 'instance_dir': did you mean 'instance_data_dir'?",
        "multidatabackend.json[images].crop: got 'sometimes'; expected true or false",
        "multidatabackend.json[images]: a local image backend needs 'instance_data_dir'",
        "multidatabackend.json[s3].resolution: got -1; must be a number > 0 (or null)",
        "multidatabackend.json[s3]: an aws backend needs 'aws_bucket_name'",
        "multidatabackend.json[5]: must be a JSON object, got str",
        "multidatabackend.json: id 's3' is used by more than one entry; ids must be unique",
    ]
    for line in expected:
        assert line in problems
    assert any("exactly one text_embeds backend" in p and "found 2" in p for p in problems)


def test_bad_lycoris_file_is_reported(workdir: Path) -> None:
    (workdir / "configs/run/lycoris_config.json").write_text(
        json.dumps(
            {"algo": "locon", "linear_alpha": 1, "factor": 0, "apply_preset": {"target_module": "Attention"}, "linear_dims": 8}
        )
    )  # linear_dim has LyCORIS's default (4): a misspelling would go unseen
    problems = problems_of(minimal(), workdir)
    assert "lycoris_config.json.algo: got 'locon'; expected one of 'lokr'" in problems
    assert "lycoris_config.json: unknown key 'linear_dims': did you mean 'linear_dim'?" in problems
    assert any(p.startswith("lycoris_config.json.factor: got 0; must be -1") for p in problems)
    assert any(p.startswith("lycoris_config.json.apply_preset") for p in problems)


def test_invalid_json_names_the_line(workdir: Path) -> None:
    path = workdir / "configs/run/config.json"
    path.write_text('{\n  "--seed": 1,\n  "--seed": 2,\n  oops\n}')
    with pytest.raises(ConfigError, match=r"not valid JSON at line 4"):
        load_config(path)


def test_direct_construction_checks_fields_together() -> None:
    with pytest.raises(ValueError, match="both 0"):
        TrainConfig(
            pretrained_model_name_or_path="m",
            data_backend_config=Path("d.json"),
            lycoris_config=Path("l.json"),
            num_train_epochs=0,
        )


def test_loading_checks_the_rules_between_fields_once(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    rules = TrainConfig.cross_field_problems

    def counted(cls: type[TrainConfig], values: dict[str, object], bad: set[str]) -> list[str]:
        calls.append(bad)
        return rules(values, bad)

    monkeypatch.setattr(TrainConfig, "cross_field_problems", classmethod(counted))
    load_config(write_config(workdir, minimal()))
    assert calls == [set()]


# ---------------------------------------------------------------- the cluster config


def test_cluster_problems_read_as_a_training_configs(tmp_path: Path) -> None:
    path = tmp_path / "cluster.json"
    path.write_text(
        json.dumps(
            {
                "num_worker": 2,
                "use_gpu": "maybe",
                "cpus_per_worker": 0,
                "num_workers": [3, 2],
                "autoscaling": "sometimes",
                "zzz": 1,
            }
        )
    )
    with pytest.raises(ConfigError) as info:
        load_cluster_config(path, {"max_failure": 1, "num_workers": "two"})
    assert str(info.value).splitlines()[0] == f"7 problem(s) in {path}:"
    assert info.value.problems == [
        "unknown key 'num_worker': did you mean 'num_workers'?",
        "'use_gpu': got 'maybe'; expected true or false",  # as "'--use_ema': got 'maybe'; expected true or false"
        "'cpus_per_worker': got 0; must be a number > 0",
        "'num_workers': got 'two'; must be an integer, or a JSON list of 2 values",
        "'autoscaling': got 'sometimes'; must be true or false, or 'auto'",
        "unknown key 'zzz': not a recognised option",
        "unknown key 'max_failure': did you mean 'max_failures'?",
    ]


def test_cluster_values_and_rules_are_reported_together(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_cluster_config(
            None,
            {"strategy": "deepspeed", "gradient_sync_dtype": "bf16", "num_workers": [3, 2], "hourly_price_head": float("inf")},
        )
    assert str(info.value).splitlines()[0] == "3 problem(s) in the cluster config:"
    num_workers, price, rule = info.value.problems
    assert num_workers == "'num_workers': got [3, 2]; num_workers must be >= 1, or [min, max] with 1 <= min <= max"
    assert price == "'hourly_price_head': got inf; must be a finite number (a number >= 0)"
    assert rule.startswith("'gradient_sync_dtype': 'bf16' applies to strategy 'ddp' only")
    with pytest.raises(ValueError, match="applies to strategy 'ddp' only"):  # built in code: the same rule
        ClusterConfig(strategy="deepspeed", gradient_sync_dtype="bf16")
    assert load_cluster_config(None, {"num_workers": [1, 3]}).num_workers == (1, 3)


def test_broken_cluster_file_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "cluster.json"
    path.write_text('{\n  "num_workers": 2,\n  "num_workers": 3,\n  "use_gpu": tru\n}')
    with pytest.raises(ConfigError, match=r"cluster.json: not valid JSON at line 4"):
        load_cluster_config(path)
    path.write_text('{"num_workers": 2, "num_workers": 3, "strategy": "zero"}')
    with pytest.raises(ConfigError) as info:
        load_cluster_config(path)
    assert info.value.problems == [
        f"{path}: key 'num_workers' appears more than once; keep one",
        "'strategy': got 'zero'; expected one of 'ddp', 'deepspeed'",
    ]
    path.write_text("[2]")
    with pytest.raises(ConfigError, match="must be a JSON object"):
        load_cluster_config(path)


# ---------------------------------------------------------------- secrets and reports


def write_webhook(workdir: Path, **fields: object) -> None:
    body = {"webhook_url": SECRET_URL, "webhook_type": "discord", **fields}
    (workdir / "configs/run/webhook.json").write_text(json.dumps(body))


def test_webhook_url_never_leaks_from_a_good_config(workdir: Path) -> None:
    write_webhook(workdir, message_prefix="relay")
    config = load_config(write_config(workdir, minimal(**{"--webhook_config": "config/run/webhook.json"})))
    assert config.webhook[0].url.get_secret_value() == SECRET_URL
    shown = [config.resolved_json(), repr(config), str(config), *config.pending_features(), *config.mapping_notes()]
    assert not any(SECRET_URL in text or "s3cr3t" in text for text in shown)
    assert config.pending_features() == []  # webhooks are built: nothing of this config is pending


@pytest.mark.parametrize(
    "webhook",
    [
        {"webhook_url": 12, "log_level": "loud", "colour": "red"},
        {"webhook_url": "ftp://" + SECRET_URL},
        {"webhook_type": "raw", "callback_url": "https://x"},
    ],
)
def test_webhook_url_never_leaks_from_errors(workdir: Path, webhook: dict[str, object]) -> None:
    write_webhook(workdir, **webhook)
    raw = minimal(**{"--webhook_config": "config/run/webhook.json", "--seed": "x"})
    with pytest.raises(ConfigError) as info:
        load_config(write_config(workdir, raw))
    assert "s3cr3t" not in str(info.value)
    assert any(p.startswith("webhook.json") for p in info.value.problems) or webhook.get("webhook_type") == "raw"


def test_aws_keys_are_masked(workdir: Path) -> None:
    backends = [
        {
            "id": "s3",
            "type": "aws",
            "aws_bucket_name": "b",
            "aws_access_key_id": "AKIAEXAMPLE",
            "aws_secret_access_key": "s3cr3t-aws",
        }
    ]
    (workdir / "configs/run/multidatabackend.json").write_text(json.dumps(backends))
    config = load_config(write_config(workdir, minimal()))
    assert config.data_backends[0].aws_secret_access_key.get_secret_value() == "s3cr3t-aws"
    shown = config.resolved_json() + repr(config) + "".join(config.pending_features())
    assert "s3cr3t" not in shown and "AKIAEXAMPLE" not in shown


def test_webhook_problems(workdir: Path) -> None:
    write_webhook(workdir, log_level="loud", colour="red")
    problems = problems_of(minimal(**{"--webhook_config": "config/run/webhook.json"}), workdir)
    assert "webhook.json.log_level: got 'loud'; expected one of 'debug', 'info', 'warning', 'error', 'critical'" in problems
    assert "webhook.json: unknown key 'colour': not a recognised option" in problems


def test_pending_features_for_the_sd3_config(in_repo: Path) -> None:
    # validation, the Hub mirror, W&B, webhooks, aws backends and the disk caches are all built
    assert load_config("configs/sd3/config.json").pending_features() == []


def test_pending_features_name_what_the_data_pipeline_ignores(workdir: Path) -> None:
    backends = [
        {"id": "images", "instance_data_dir": "data", "crop": True, "crop_aspect": "random"},
        {"id": "more", "instance_data_dir": "more", "probability": 0.5},
        {"id": "square", "instance_data_dir": "square", "crop": False, "crop_aspect": "random"},
    ]
    (workdir / "configs/run/multidatabackend.json").write_text(json.dumps(backends))
    assert load_config(write_config(workdir, minimal())).pending_features() == [
        "per-dataset sampling weights and random crop aspects are not built yet: "
        "multidatabackend.json[images].crop_aspect=random, multidatabackend.json[more].probability=0.5 "
        "are parsed but have no effect in this run"
    ]


def test_pending_features_empty_for_a_minimal_config(workdir: Path) -> None:
    backends = [{"id": "images", "instance_data_dir": "data"}]
    (workdir / "configs/run/multidatabackend.json").write_text(json.dumps(backends))
    assert load_config(write_config(workdir, minimal())).pending_features() == []


def test_mapping_notes_for_the_sd3_config(in_repo: Path) -> None:
    notes = "\n".join(load_config("configs/sd3/config.json").mapping_notes())
    assert "--lora_rank=128, --lora_alpha=128 are ignored" in notes and "linear_dim=10000" in notes
    assert "quantized to int8 on the CPU" in notes
    assert "step-0 validation of the base model" in notes


def test_epochs_ignored_note(workdir: Path) -> None:
    config = load_config(write_config(workdir, minimal(**{"--num_train_epochs": 3})))
    assert any("--num_train_epochs=3 is ignored" in n for n in config.mapping_notes())


def test_validation_resolution_list(workdir: Path) -> None:
    config = load_config(write_config(workdir, minimal(**{"--validation_resolution": "1024x768, 512"})))
    assert config.validation_resolutions == [(1024, 768), (512, 512)]


def test_parse_config_takes_a_dict_and_the_config_folder(workdir: Path) -> None:
    config = parse_config(minimal(), Path("configs/run"))
    assert config.source_path is None and config.lycoris_config == Path("configs/run/lycoris_config.json")
    with pytest.raises(ConfigError, match="must be a JSON object"):
        parse_config(["--seed"], Path("configs/run"))  # type: ignore[arg-type]


def test_ray_trains_own_settings_come_from_the_file_then_the_environment_then_our_default(tmp_path: Path) -> None:
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps({"worker_start_seconds": 15}))
    written = load_cluster_config(path)
    user = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "3", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "120"}
    # the key in the file wins over the variable; the key left out leaves the user's variable alone
    assert written.ray_train_environment(user) == {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15"}
    # nothing set anywhere: our defaults, which for the poll differ from Ray's own 2 s
    assert load_cluster_config(None).ray_train_environment({}) == {
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "60",
    }
