"""webhook_config in SimpleTuner's forms: a file, inline JSON, a list of backends; secrets stay masked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from relay_train.config import ConfigError, parse_config

DISCORD = "https://discord.com/api/webhooks/123456/s3cr3t-discord-token"
RAW = "https://hooks.example.com/relay/s3cr3t-raw-path"
TOKEN = "s3cr3t-api-key-42"
BACKENDS = [{"id": "images", "instance_data_dir": "data"}]
LYCORIS = {"algo": "lokr", "linear_dim": 10000, "linear_alpha": 1}


@pytest.fixture
def base(tmp_path: Path) -> Path:
    (tmp_path / "multidatabackend.json").write_text(json.dumps(BACKENDS))
    (tmp_path / "lycoris.json").write_text(json.dumps(LYCORIS))
    return tmp_path


def parse(base: Path, webhook_config: object, **extra: object):
    raw = {
        "--pretrained_model_name_or_path": "m",
        "--data_backend_config": "multidatabackend.json",
        "--lycoris_config": "lycoris.json",
        "--max_train_steps": 10,
        "--webhook_config": webhook_config,
        **extra,
    }
    return parse_config(raw, base)


def both() -> list[dict[str, object]]:
    return [
        {"webhook_type": "discord", "webhook_url": DISCORD, "message_prefix": "relay", "log_level": "warning"},
        {"webhook_type": "raw", "callback_url": RAW, "auth_token": TOKEN, "ssl_no_verify": True, "log_level": "debug"},
    ]


def assert_masked(config) -> None:
    shown = config.resolved_json() + repr(config) + "".join(config.pending_features() + config.mapping_notes())
    assert "s3cr3t" not in shown


def test_file_with_one_backend(base: Path) -> None:
    (base / "webhook.json").write_text(json.dumps(both()[0]))
    config = parse(base, "webhook.json")
    assert config.webhook_config == base / "webhook.json"
    assert [h.webhook_type for h in config.webhook] == ["discord"] and config.webhook[0].log_level == "warning"
    assert_masked(config)


def test_file_with_a_list_and_inline_json(base: Path) -> None:
    (base / "hooks.json").write_text(json.dumps(both()))
    for source in ("hooks.json", json.dumps(both()), both(), json.dumps(both()[1])):
        config = parse(base, source)
        raw = config.webhook[-1]
        assert raw.webhook_type == "raw" and raw.url.get_secret_value() == RAW
        assert raw.auth_token.get_secret_value() == TOKEN and raw.ssl_no_verify
        assert_masked(config)


def test_raw_accepts_webhook_url(base: Path) -> None:
    config = parse(base, {"webhook_type": "raw", "webhook_url": RAW})
    assert config.webhook[0].url.get_secret_value() == RAW


def test_tracking_and_webhooks_are_no_longer_pending(base: Path) -> None:
    config = parse(base, both(), report_to="wandb", tracker_project_name="p")
    assert config.report_to == "wandb" and len(config.webhook) == 2
    assert config.pending_features() == []


def test_problems_name_the_entry_and_hide_the_secret(base: Path) -> None:
    bad = [both()[0], {"webhook_type": "raw", "auth_token": TOKEN}, {"webhook_url": "ftp://s3cr3t", "colour": 1}]
    with pytest.raises(ConfigError) as info:
        parse(base, json.dumps(bad))
    problems = info.value.problems
    assert "webhook_config[1]: a raw webhook needs 'callback_url'" in problems
    assert "webhook_config[2]: unknown key 'colour': not a recognised option" in problems
    assert "s3cr3t" not in str(info.value)
    with pytest.raises(ConfigError, match="inline JSON is not valid") as info:
        parse(base, '[{"webhook_url": "' + DISCORD + '"')
    assert "s3cr3t" not in str(info.value)
