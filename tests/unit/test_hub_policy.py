"""The Hub mirror's pure parts: what to add and prune, backoff, the commit window, the model card."""

from __future__ import annotations

import pytest

from orchestrator.services.hub import CommitWindow, HubSettings, model_card, plan_checkpoints
from orchestrator.core.policy import retry_delay


def test_plan_keeps_the_newest_five_of_everything_known():
    assert plan_checkpoints(set(), {1}, 5) == ([1], [])
    assert plan_checkpoints({1, 2, 3, 4, 5}, {6}, 5) == ([6], [1])
    # fell behind: 6..9 pending at once -> one round adds the newest and never uploads what it would prune
    assert plan_checkpoints({1, 2, 3, 4, 5}, {6, 7, 8, 9, 10, 11}, 5) == ([7, 8, 9, 10, 11], [1, 2, 3, 4, 5])
    # reconcile after a resume: the Hub has 1..5, storage 4..8
    assert plan_checkpoints({1, 2, 3, 4, 5}, {4, 5, 6, 7, 8}, 5) == ([6, 7, 8], [1, 2, 3])
    assert plan_checkpoints({4, 5, 6, 7, 8}, {4, 5, 6, 7, 8}, 5) == ([], [])


def test_retry_delay_doubles_to_a_cap_and_honours_retry_after():
    # as HubMirror._failed asks: no status (every failure is retried), no jitter, the wait bounded by the cap
    assert [retry_delay(n, 2.0, 30.0, retry_after=None, longest_wait=30.0) for n in (1, 2, 3, 4, 5, 6)] == [2, 4, 8, 16, 30, 30]
    assert retry_delay(1, 2.0, 30.0, retry_after=7.0, longest_wait=30.0) == 7.0
    # a huge Retry-After is bounded (close stays responsive)
    assert retry_delay(1, 2.0, 30.0, retry_after=3600.0, longest_wait=30.0) == 30.0


def test_commit_window_is_a_sliding_window():
    now = [0.0]
    window = CommitWindow(limit=3, window_s=10.0, clock=lambda: now[0])
    for t in (0.0, 1.0, 2.0):
        now[0] = t
        assert window.wait_s() == 0
        window.record()
    now[0] = 5.0
    assert window.wait_s() == pytest.approx(5.0)  # the commit at t=0 leaves the window at t=10
    now[0] = 10.0
    assert window.wait_s() == 0
    with pytest.raises(ValueError, match="at least 1"):
        CommitWindow(0, 10.0)


def _settings(**kw) -> HubSettings:
    return HubSettings(
        **{
            "repo_id": "me/run",
            "run_name": "run",
            "base_model": "stabilityai/stable-diffusion-3.5-medium",
            "summary": {"optimizer": "bnb-adamw8bit, lr 5e-05"},
            "total_steps": 300000,
            **kw,
        }
    )


def test_model_card_says_what_and_how_to_load():
    card = model_card(
        _settings(),
        step=10000,
        final=False,
        checkpoints=[6000, 8000, 10000],
        images={10000: ["validation/step-10000/cat.png"]},
        scores={10000: {"clip_score": 0.3125}},
    )
    assert card.startswith("---\n") and "base_model: stabilityai/stable-diffusion-3.5-medium" in card
    assert "Step 10000 of 300000 (training in progress)" in card
    assert "`sd35-run-lokr-ema.safetensors`" in card and "`checkpoint-10000`" in card
    assert "![cat](validation/step-10000/cat.png)" in card and "| 10000 | 0.3125 |" in card
    assert "create_lycoris_from_weights(1.0, path, pipe.transformer)" in card
    assert 'hf_hub_download("me/run", "sd35-run-lokr-ema.safetensors")' in card
    assert card == model_card(
        _settings(),
        step=10000,
        final=False,
        checkpoints=[6000, 8000, 10000],
        images={10000: ["validation/step-10000/cat.png"]},
        scores={10000: {"clip_score": 0.3125}},
    )


def test_model_card_leaves_a_local_base_model_out_of_the_metadata(tmp_path):
    card = model_card(_settings(base_model=str(tmp_path)), step=None, final=True, checkpoints=[], images={}, scores={})
    assert "base_model:" not in card.split("---")[1]  # the Hub rejects a path there
    assert "(final)" in card
