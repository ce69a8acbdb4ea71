"""The Hub round planner: repo view + pending -> one commit, worked out by hand; no client, no clock."""

from __future__ import annotations

from orchestrator.services.hub_card import model_card
from orchestrator.services.hub_plan import HubSettings, HubView, Round, plan_round

ADAPTER = "sd35-run-lokr.safetensors"


def _settings(**kw) -> HubSettings:
    return HubSettings(**{"repo_id": "me/run", "run_name": "run", "base_model": "stabilityai/stable-diffusion-3.5-medium", **kw})


def _view(steps=(), validation=(), extra=()) -> HubView:
    files = {f"checkpoints/checkpoint-{s}/{name}" for s in steps for name in ("manifest.json", "adapter.safetensors")}
    files |= {f"validation/step-{s}/{name}" for s in validation for name in ("cat.png", "scores.json")}
    return HubView.from_files(files | set(extra))


def test_the_view_counts_only_whole_checkpoints():
    torn = {"checkpoints/checkpoint-9/adapter.safetensors"}  # uploaded without its manifest
    view = _view(steps=[1, 2], validation=[2], extra=torn)
    assert view.steps == {1, 2} and view.validation == {2}
    assert view.image_names(2) == ["validation/step-2/cat.png"]
    assert view.scores_to_read(set()) == [2] and view.scores_to_read({2}) == []


def test_an_empty_repo_gets_the_checkpoint_and_the_root_adapters():
    plan = plan_round(_settings(), _view(), {5}, {})
    assert plan == Round(add=[5], delete=[], root=5, images={}, drop_validation=[])
    assert plan.fetch == [5] and plan.message() == "checkpoint-5"


def test_falling_behind_coalesces_into_one_round_that_prunes():
    plan = plan_round(_settings(), _view(steps=[1, 2, 3, 4, 5]), {6, 7, 8, 9, 10, 11}, {})
    assert (plan.add, plan.delete, plan.root) == ([7, 8, 9, 10, 11], [1, 2, 3, 4, 5], 11)
    assert plan.fetch == [7, 8, 9, 10, 11]  # 6 is never uploaded: it would only be pruned
    assert plan.message() == "checkpoint-11; prune checkpoint-1, checkpoint-2, checkpoint-3, checkpoint-4, checkpoint-5"
    after = plan.after(_view(steps=[1, 2, 3, 4, 5]), _settings())
    assert after.steps == {7, 8, 9, 10, 11} and ADAPTER in after.files


def test_a_repo_that_already_matches_needs_no_commit():
    view = _view(steps=[4, 5, 6, 7, 8], extra={ADAPTER})
    assert plan_round(_settings(), view, {4, 5, 6, 7, 8}, {}) is None
    # the same repo without its root adapter: the newest pending step puts it back, with nothing to add
    again = plan_round(_settings(), _view(steps=[4, 5, 6, 7, 8]), {8}, {})
    assert (again.add, again.delete, again.root) == ([], [], 8)


def test_an_older_pending_step_never_moves_the_root():
    plan = plan_round(_settings(keep=3), _view(steps=[4, 5], extra={ADAPTER}), {3, 6}, {})
    assert (plan.add, plan.delete, plan.root) == ([6], [], 6)
    assert plan_round(_settings(keep=3), _view(steps=[4, 5, 6], extra={ADAPTER}), {3}, {}) is None


def test_the_config_decides_what_is_pushed():
    only_adapters = plan_round(_settings(push_checkpoints=False), _view(), {5}, {})
    assert (only_adapters.add, only_adapters.root) == ([], 5)
    only_checkpoints = plan_round(_settings(push_adapters=False), _view(), {5}, {})
    assert (only_checkpoints.add, only_checkpoints.root) == ([5], None)


def test_validation_keeps_the_newest_and_drops_the_rest():
    images = {6: [("dog.png", b"png6")]}
    plan = plan_round(_settings(keep=2), _view(steps=[4], validation=[2, 4], extra={ADAPTER}), set(), images)
    assert (plan.add, plan.root, plan.drop_validation) == ([], None, [2])
    assert plan.images == images and plan.message() == "validation and model card"
    after = plan.after(_view(steps=[4], validation=[2, 4]), _settings(keep=2))
    assert after.validation == {4, 6} and "validation/step-2/cat.png" not in after.files
    assert plan.card_images(after) == {4: ["validation/step-4/cat.png"], 6: ["validation/step-6/dog.png"]}
    # images older than everything kept are never uploaded
    stale = plan_round(_settings(keep=2), _view(validation=[4, 6]), set(), {1: [("old.png", b"x")]})
    assert stale is None


def test_the_card_step_is_the_newest_held_after_the_commit():
    view = _view(steps=[1, 2, 3])
    plan = plan_round(_settings(keep=3), view, {4}, {})
    assert plan.delete == [1] and plan.card_step(view) == 4
    assert plan_round(_settings(), _view(), set(), {}) is None


def test_the_card_is_a_model_card_and_the_same_inputs_give_the_same_bytes():
    from huggingface_hub import ModelCard

    kwargs = {
        "step": 8,
        "final": True,
        "checkpoints": [4, 8],
        "images": {8: ["validation/step-8/cat.png"]},
        "scores": {8: {"clip_score": 0.25}},
    }
    text = model_card(_settings(), **kwargs)
    card = ModelCard(text)
    assert card.data.library_name == "lycoris" and card.data.pipeline_tag == "text-to-image"
    assert card.data.base_model == "stabilityai/stable-diffusion-3.5-medium" and "lokr" in card.data.tags
    assert "Step 8 (final)" in card.text and "| 8 | 0.25 |" in card.text
    assert model_card(_settings(), **kwargs) == text
    assert model_card(_settings(), **{**kwargs, "step": 9}) != text
