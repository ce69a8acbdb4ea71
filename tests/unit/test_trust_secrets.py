"""Class: secrets reflected in derived text. A secret-bearing key's value (webhook_config above all) is never
echoed by a message in any form: not the URL, not its path, not its last segment (the token), not a
candidate path built from it."""

from __future__ import annotations

import pytest

from relay_train.config import ConfigError, parse_config
from relay_train.redaction import mask, secrets_in
from support.configs import raw_config

TOKEN = "Zk9tT0tFTi1uZXZlci1zaG93bi0xMjM0NTY3ODkw"


@pytest.mark.parametrize(
    "value",
    [
        f"https://discord.com/api/webhooks/123456/{TOKEN}",
        f"http://127.0.0.1:8080/hook/{TOKEN}?wait=true",
        f"discord.com/api/webhooks/123456/{TOKEN}",  # no scheme: looked up as a file, and not found
        f"webhooks/{TOKEN}",
        f"https://hooks.example/notify?token={TOKEN}",
    ],
)
def test_a_webhook_url_in_place_of_a_file_is_never_echoed(tmp_path, value):
    with pytest.raises(ConfigError) as err:
        parse_config(raw_config(tmp_path, **{"--webhook_config": value}), tmp_path)
    text = str(err.value)
    assert "webhook_config" in text
    assert TOKEN not in text and TOKEN[:12] not in text and "123456" not in text and "hooks.example" not in text


def test_derived_forms_of_a_secret_are_masked_too():
    url = f"https://discord.com/api/webhooks/123456789/{TOKEN}?thread_id=987654321"
    secrets = secrets_in({"--webhook_config": url})
    for derived in (url, f"/api/webhooks/123456789/{TOKEN}", TOKEN, "987654321"):
        assert mask(f"tried /work/{derived}", secrets) == "tried /work/<hidden>"
    assert mask("2 webhooks sent", secrets) == "2 webhooks sent"  # words are not secrets
