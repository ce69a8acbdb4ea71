"""The validation prompt list: run prompt, built-in library, user file."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from relay_train.validate.prompts import PROMPT_LIBRARY, read_prompt_file, slug, validation_prompts


def _config(prompt=None, library=False, prompt_file=None):
    return SimpleNamespace(validation_prompt=prompt, validation_prompt_library=library, validation_prompt_file=prompt_file)


def test_library_covers_the_model_cards_focus_with_stable_names() -> None:
    assert 20 <= len(PROMPT_LIBRARY) <= 30
    assert all(name == slug(name) for name in PROMPT_LIBRARY)  # names are file-safe as they are
    assert len(set(PROMPT_LIBRARY.values())) == len(PROMPT_LIBRARY)
    quoted = [p for p in PROMPT_LIBRARY.values() if '"' in p]  # text to render, in quotes
    assert len(quoted) >= 12
    for word in ("sign", "handwritten", "poster", "photo"):
        assert any(word in p for p in PROMPT_LIBRARY.values()), word


def test_order_is_run_prompt_then_library_then_user_file(tmp_path: Path) -> None:
    user = tmp_path / "prompts.txt"
    user.write_text("# my prompts\n\na red bicycle\nA red bicycle!\n")
    pairs = validation_prompts(_config("a cat", library=True, prompt_file=user))
    assert pairs[0] == ("validation", "a cat")
    assert pairs[1 : 1 + len(PROMPT_LIBRARY)] == list(PROMPT_LIBRARY.items())
    # the two user lines slug to the same name: the second gets a suffix, so files never collide
    assert pairs[-2:] == [("user-a-red-bicycle", "a red bicycle"), ("user-a-red-bicycle-2", "A red bicycle!")]
    assert len({name for name, _ in pairs}) == len(pairs)


def test_json_prompt_files(tmp_path: Path) -> None:
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(["a neon sign", "a handwritten note"]))
    assert read_prompt_file(listed) == [("user-a-neon-sign", "a neon sign"), ("user-a-handwritten-note", "a handwritten note")]
    named = tmp_path / "named.json"
    named.write_text(json.dumps({"Shop Sign": "a shop sign reading OPEN"}))
    assert read_prompt_file(named) == [("shop-sign", "a shop sign reading OPEN")]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="validation_prompt_file .*expected a JSON list of strings"):
        read_prompt_file(bad)


def test_nothing_configured_means_no_prompts() -> None:
    assert validation_prompts(_config()) == []
