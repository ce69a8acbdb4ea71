"""Masking secrets in text: pure functions shared by config errors (here) and every log line
(orchestrator/redact.py installs them on the logging system)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from pydantic import SecretStr

from relay_train import json_text

MASK = "<hidden>"
MIN_LENGTH = 8
"""Shorter values are not masked: real keys and tokens are longer, and masking a short word (moto's
test credential 'testing', say) would garble ordinary text."""
SECRET_ENV = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "WANDB_API_KEY",
)
"""Environment variables whose values are secrets."""
SECRET_KEY_WORDS = ("webhook", "callback_url", "token", "secret", "password", "api_key", "access_key")
"""A config key containing one of these holds a secret (webhook_url, auth_token, aws_secret_access_key...)."""


def plain(value: str | SecretStr | None) -> str | None:
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def url_parts(url: str) -> list[str]:
    """A secret and the forms of it a message may carry instead: for a URL, its path (urllib3's 'Max
    retries exceeded with url: /api/...' shows the path alone, and for Discord the path carries the
    token), and every path segment and query value long enough to be a token (a "file not found" built
    from a URL ends with its last segment: the token)."""
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    pieces = parts.path.replace("\\", "/").split("/") + [v for _, _, v in (q.partition("=") for q in parts.query.split("&"))]
    tokens = [p for p in pieces if len(p) >= MIN_LENGTH and (len(p) >= 20 or any(c.isdigit() for c in p))]  # not 'webhooks'
    return [url, *dict.fromkeys(p for p in [path, parts.path, *tokens] if len(p.strip("/")) >= MIN_LENGTH and p != url)]


def mask(text: str, secrets: Iterable[str | SecretStr]) -> str:
    """text with every secret (of at least MIN_LENGTH characters) replaced by MASK, longest first so a
    URL is masked whole before its path is."""
    values = {plain(s) for s in secrets}
    for secret in sorted((v for v in values if v and len(v) >= MIN_LENGTH), key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


def is_secret_key(key: Any) -> bool:
    """A config key whose value is a secret: never echoed, in any form."""
    return isinstance(key, str) and any(word in key.lower() for word in SECRET_KEY_WORDS)


def _inline_json(text: str) -> Any:
    if text.strip()[:1] not in ("{", "["):
        return None
    try:
        return json_text.loads(text)
    except ValueError:
        return None


def secrets_in(data: Any, secret: bool = False) -> set[str]:
    """Every secret a raw (not yet validated) config holds: the values under secret-looking keys, the
    URLs and tokens of inline webhook JSON, and every http(s) URL written under such a key."""
    found: set[str] = set()
    if isinstance(data, dict):
        for key, value in data.items():
            found |= secrets_in(value, secret or is_secret_key(key))
    elif isinstance(data, list):
        for item in data:
            found |= secrets_in(item, secret)
    elif isinstance(data, (str, SecretStr)):
        text = plain(data) or ""
        inline = _inline_json(text)
        if inline is not None:
            found |= secrets_in(inline, secret)
            if secret:
                found.add(text)
        elif secret:
            found.update(url_parts(text))  # the value and its derived forms: path, segments, query values
    return {value for value in found if len(value) >= MIN_LENGTH}


def saved_hf_token(environ: Mapping[str, str]) -> str | None:
    """The token `hf auth login` stored, read as huggingface_hub does (HF_TOKEN_PATH, else HF_HOME/token)."""
    path = environ.get("HF_TOKEN_PATH") or os.path.join(
        environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"), "token"
    )
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def environment_secrets(environ: Mapping[str, str] | None = None) -> set[str]:
    """The secret environment variables' values and the saved Hugging Face token."""
    environ = os.environ if environ is None else environ
    found = {environ.get(name, "") for name in SECRET_ENV} | {saved_hf_token(environ) or ""}
    return {value for value in found if len(value) >= MIN_LENGTH}
