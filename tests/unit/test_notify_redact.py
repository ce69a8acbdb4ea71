"""Secret redaction: every log record this process makes, whichever logger and handler carry it."""

from __future__ import annotations

import logging

import pytest

from orchestrator.core import redact
from relay_train.config import TrainConfig
from relay_train.config.files import DataBackendConfig, WebhookConfig

URL = "https://discord.com/api/webhooks/123456/s3cr3t-discord-token"
TOKEN = "s3cr3t-api-key-42"


@pytest.fixture
def redactor():
    redact.uninstall()
    yield redact.install([URL, *redact.url_parts(URL), TOKEN])
    redact.uninstall()


def test_every_log_record_is_masked(redactor, caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("some.library")
    with caplog.at_level(logging.DEBUG):
        log.info("posting to %s with %s", URL, TOKEN)
        log.warning("Max retries exceeded with url: /api/webhooks/123456/s3cr3t-discord-token")
        try:
            raise ConnectionError(f"cannot reach {URL}")
        except ConnectionError:
            log.exception("delivery failed")
        log.error("stack", stack_info=True, extra={"note": "x"})
    assert "s3cr3t" not in caplog.text and "s3cr3t" not in "".join(r.getMessage() for r in caplog.records)
    assert caplog.text.count(redact.MASK) >= 4 and "delivery failed" in caplog.text


def test_install_twice_adds_secrets(redactor) -> None:
    again = redact.install(["another-s3cr3t-value"])
    assert again is redactor
    assert redact.redact(f"{URL} another-s3cr3t-value s3cr3t") == f"{redact.MASK} {redact.MASK} s3cr3t"


def test_short_values_are_not_masked() -> None:
    assert redact.redact("testing the test", ["testing", "t"]) == "testing the test"


def test_secret_values_from_config_and_environment(tmp_path) -> None:
    config = TrainConfig(
        pretrained_model_name_or_path="m",
        data_backend_config=tmp_path / "d.json",
        lycoris_config=tmp_path / "l.json",
        max_train_steps=1,
        webhook=[WebhookConfig(webhook_url=URL), WebhookConfig(webhook_type="raw", callback_url="https://h/x", auth_token=TOKEN)],
        data_backends=[
            DataBackendConfig(
                id="s3",
                type="aws",
                aws_bucket_name="b",
                aws_access_key_id="AKIAEXAMPLEKEY",
                aws_secret_access_key="aws-s3cr3t-key",
            )
        ],
    )
    (tmp_path / "token").write_text("hf_savedtoken123\n")
    env = {
        "HF_TOKEN": "hf_envtoken456",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "HF_TOKEN_PATH": str(tmp_path / "token"),
        "HOME": str(tmp_path),
    }
    found = redact.secret_values(config, env)
    assert {
        URL,
        "/api/webhooks/123456/s3cr3t-discord-token",
        TOKEN,
        "https://h/x",
        "AKIAEXAMPLEKEY",
        "aws-s3cr3t-key",
        "hf_envtoken456",
        "hf_savedtoken123",
    } <= found
    assert "testing" not in found  # moto's test credential: too short to be a real key
