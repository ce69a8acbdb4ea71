"""Class: secrets sent where the user did not point. A webhook receiver that answers a redirect to another
host never gets the request re-sent there (X-API-Key, the Discord token in the path, the body); and the
hosts a webhook may name are decided at config time (link-local and metadata names refused)."""

from __future__ import annotations

import logging
import time

import pytest

from orchestrator.core.http import outbound_session
from orchestrator.services.notify import Notifier, RetryPolicy, WebhookType
from relay_train.config.files import WebhookConfig, load_webhook
from support.loopback import Fault
from support.webhook_receiver import WebhookReceiver

FAST = RetryPolicy(timeout=2.0, base=0.05, cap=0.2)
TOKEN = "x-api-key-never-elsewhere-77"


@pytest.mark.parametrize("status", [301, 302, 307, 308])
@pytest.mark.parametrize("kind", ["raw", "discord"])
def test_a_redirect_to_another_host_is_never_followed(status, kind, caplog) -> None:
    with WebhookReceiver() as hook, WebhookReceiver() as elsewhere:
        target = f"http://localhost:{elsewhere.port}/stolen"  # another host name, same machine
        hook.fail(Fault("status", status=status, count=5, body=b"", headers={"Location": target}))
        if kind == "raw":
            backend = WebhookConfig(webhook_type="raw", callback_url=hook.url("/relay"), auth_token=TOKEN)
        else:
            backend = WebhookConfig(webhook_type="discord", webhook_url=hook.url("/api/webhooks/1/tok-secret-123"))
        with caplog.at_level(logging.WARNING), Notifier([backend], "run-1", policy=FAST) as notifier:
            notifier.event(WebhookType.RUN_STARTED, "info", 0, "started", {})
            deadline = time.monotonic() + 3
            while not hook.attempts and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)  # room for a follow-up or a retry, which must not come
        assert elsewhere.attempts == []
        assert len(hook.attempts) == 1  # a redirect is not retried either: the same request never passes
    assert any("never follows" in r.getMessage() for r in caplog.records)


def test_the_outbound_session_ignores_a_caller_asking_for_redirects() -> None:
    with WebhookReceiver() as hook, WebhookReceiver() as elsewhere:
        hook.fail(Fault("status", status=302, count=1, body=b"", headers={"Location": f"http://localhost:{elsewhere.port}/x"}))
        answer = outbound_session().post(
            hook.url("/relay"), json={}, headers={"X-API-Key": TOKEN}, allow_redirects=True, timeout=5
        )
        assert answer.status_code == 302 and elsewhere.attempts == []


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/secret-path",
        "http://[fe80::1]/hook-secret-path",
        "http://metadata.google.internal/computeMetadata/v1/hook",
        "http://2852039166/hook-secret-path",  # 169.254.169.254 as one number
        "http://[::ffff:169.254.169.254]/hook-secret-path",
    ],
)
def test_link_local_and_metadata_hosts_are_refused_without_echoing_the_url(url) -> None:
    webhooks, problems = load_webhook_text({"webhook_type": "raw", "callback_url": url})
    assert webhooks == [] and len(problems) == 1
    assert "link-local" in problems[0] and "secret-path" not in problems[0] and "169.254" not in problems[0]


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8080/hook", "http://localhost/hook", "http://10.0.0.5/hook", "https://discord.com/api/webhooks/1/t"]
)
def test_loopback_private_and_public_hosts_are_accepted(url) -> None:
    webhooks, problems = load_webhook_text({"webhook_type": "raw", "callback_url": url})
    assert problems == [] and len(webhooks) == 1


def load_webhook_text(entry: dict):
    import json

    from pydantic import SecretStr

    return load_webhook(SecretStr(json.dumps(entry)))
