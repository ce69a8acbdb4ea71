"""Keep secrets (webhook URLs, auth tokens, the HF token, AWS keys) out of every log line.

`install(secret_values(config))` masks the values in each log record this process creates, whichever
logger or handler it goes through: it wraps the log record factory, so the message, its arguments, an
exception's traceback and a stack dump are all redacted before any handler (Ray's, pytest's caplog, a
file) formats them. Calling it again adds secrets to the same redactor. The CLI, each Ray worker and
the steward call it once at start-up; `redact(text)` masks other text (status output, webhook payloads).
"""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Iterable

from pydantic import SecretStr

from relay_train.config import TrainConfig
from relay_train.redaction import (  # noqa: F401  (the masking rules, shared with config errors)
    MASK,
    MIN_LENGTH,
    SECRET_ENV,
    environment_secrets,
    url_parts,
)
from relay_train.redaction import mask as _mask
from relay_train.redaction import plain as _plain


def secret_values(config: TrainConfig | None = None, environ: dict[str, str] | None = None) -> set[str]:
    """Every secret a run knows: the config's webhook URLs and tokens, its data backends' AWS keys,
    the secret environment variables and the saved Hugging Face token."""
    environ = dict(os.environ if environ is None else environ)
    found: set[str] = set()
    for hook in config.webhook if config else []:
        for url in (hook.webhook_url, hook.callback_url):
            if url is not None:
                found.update(url_parts(url.get_secret_value()))
        found.add(_plain(hook.auth_token) or "")
    for backend in config.data_backends if config else []:
        found.update(_plain(v) or "" for v in (backend.aws_access_key_id, backend.aws_secret_access_key))
    found |= environment_secrets(environ)
    return {value for value in found if len(value) >= MIN_LENGTH}


class Redactor(logging.Filter):
    """Masks known secret values in text and in log records. Also usable as a handler or logger filter."""

    def __init__(self, secrets: Iterable[str | SecretStr] = ()) -> None:
        super().__init__()
        self._secrets: list[str] = []
        self.add(secrets)

    def add(self, secrets: Iterable[str | SecretStr]) -> None:
        values = {_plain(s) for s in secrets} | set(self._secrets)
        # longest first, so a URL is masked whole before its path is
        self._secrets = sorted((v for v in values if v and len(v) >= MIN_LENGTH), key=len, reverse=True)

    def redact(self, text: str) -> str:
        return _mask(text, self._secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact the record in place (message with its arguments, traceback, stack); never drops it."""
        if not self._secrets or getattr(record, "_relay_redacted", False):
            return True
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: leave it for logging to report, but masked
            message = f"{record.msg} {record.args}"
        record.msg, record.args = self.redact(message), ()
        if record.exc_info and not record.exc_text:
            record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        record._relay_redacted = True
        return True

    def _factory(self, previous):
        def make_record(*args, **kwargs) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            self.filter(record)
            return record

        make_record.redactor = self  # how install() finds the redactor already in place
        make_record.previous = previous
        return make_record


def installed() -> Redactor | None:
    """The redactor this process's log record factory applies, if any."""
    return getattr(logging.getLogRecordFactory(), "redactor", None)


def install(secrets: Iterable[str | SecretStr]) -> Redactor:
    """Mask these values in every log record this process creates from now on; returns the redactor.

    A second call adds to the same redactor rather than stacking another."""
    current = installed()
    if current is not None:
        current.add(secrets)
        return current
    redactor = Redactor(secrets)
    logging.setLogRecordFactory(redactor._factory(logging.getLogRecordFactory()))
    return redactor


def uninstall() -> None:
    """Restore the log record factory that install() wrapped (tests)."""
    factory = logging.getLogRecordFactory()
    if hasattr(factory, "redactor"):
        logging.setLogRecordFactory(factory.previous)


def redact(text: str, secrets: Iterable[str | SecretStr] | None = None) -> str:
    """Mask `secrets` in text; without them, the secrets of the installed redactor."""
    if secrets is not None:
        return Redactor(secrets).redact(text)
    current = installed()
    return current.redact(text) if current else text
