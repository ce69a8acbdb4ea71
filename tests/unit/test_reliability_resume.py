"""The resume policy: every config difference between a checkpoint and the run resuming it is allowed,
refused or warned about (relay_train/resume.py). Pure."""

from __future__ import annotations

from relay_train.resume import classify_config_changes, refusal_message, verdict_for

SAVED = {
    "learning_rate": 1e-4,
    "max_train_steps": 100,
    "seed": 42,
    "optimizer": "adamw",
    "train_batch_size": 2,
    "lycoris": {"algo": "lokr", "linear_dim": 10000, "factor": 4},
    "validation_steps": 50,
    "flow_schedule_shift": 3.0,
    "source_path": "/a/config.json",
    "webhook_config": "**********",
    "resume_from_checkpoint": "latest",
}


def _classify(step=40, **changed):
    return {c.key: c for c in classify_config_changes(SAVED, {**SAVED, **changed}, step)}


def test_the_same_config_has_no_changes():
    assert classify_config_changes(SAVED, dict(SAVED), 40) == []
    assert _classify(source_path="/elsewhere/config.json") == {}  # where the file lives says nothing


def test_length_learning_rate_and_validation_changes_are_allowed():
    changes = _classify(max_train_steps=300, learning_rate=5e-5, validation_steps=10)
    assert {k: c.verdict for k, c in changes.items()} == {
        "max_train_steps": "allowed",
        "learning_rate": "allowed",
        "validation_steps": "allowed",
    }
    assert changes["learning_rate"].describe() == "learning_rate: 0.0001 -> 5e-05"


def test_changes_the_state_cannot_follow_are_refused_with_a_reason():
    changes = _classify(
        seed=1, optimizer="bnb-adamw8bit", train_batch_size=4, lycoris={"algo": "lokr", "linear_dim": 16, "factor": 4}
    )
    assert {c.verdict for c in changes.values()} == {"refused"}
    assert "LyCORIS network's shape" in changes["lycoris"].reason
    message = refusal_message("out/checkpoint-40", list(changes.values()))
    assert message.startswith("cannot resume from out/checkpoint-40: 4 setting(s) differ")
    assert "seed: 42 -> 1" in message and "resume_from_checkpoint none" in message


def test_max_train_steps_below_the_checkpoint_is_refused_and_at_it_allowed():
    assert _classify(step=40, max_train_steps=30)["max_train_steps"].verdict == "refused"
    assert "already at step 40" in _classify(step=40, max_train_steps=30)["max_train_steps"].reason
    assert _classify(step=40, max_train_steps=40)["max_train_steps"].verdict == "allowed"


def test_other_recipe_changes_are_warned_and_unknown_keys_default_to_warned():
    assert _classify(flow_schedule_shift=1.0)["flow_schedule_shift"].verdict == "warned"
    assert verdict_for("a_key_added_later") == "warned"
    assert verdict_for("validation_resolution") == "allowed" and verdict_for("use_ema") == "refused"


def test_a_key_the_old_checkpoint_lacks_counts_as_its_default():
    current = {**SAVED, "nonfinite_policy": "skip", "caption_dropout_probability": 0.1}
    changes = classify_config_changes(
        SAVED, current, 40, defaults={"nonfinite_policy": "skip", "caption_dropout_probability": 0.0}
    )
    assert [(c.key, c.verdict) for c in changes] == [("caption_dropout_probability", "warned")]


def test_secrets_are_never_shown():
    change = _classify(webhook_config="/new/webhook.json")["webhook_config"]
    assert change.verdict == "allowed" and change.describe() == "webhook_config: (hidden) -> (hidden)"
