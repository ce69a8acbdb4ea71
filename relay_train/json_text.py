"""JSON text from outside (config files, --set values, inline webhook JSON, a checkpoint's manifest) parsed
with a bounded depth: Python's parser meets deep nesting with a RecursionError, which no caller expects
and every later walk over the data (secrets, ranges, schemas) would meet again. Here it is a ValueError
naming the depth, like any other malformed JSON."""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 64  # the deepest config Relay reads is 4 levels (a LyCORIS module_algo_map entry)


class TooDeepError(ValueError):
    """JSON nested deeper than MAX_DEPTH."""


def loads(text: str | bytes, **kwargs: Any) -> Any:
    """json.loads, refusing structures nested deeper than MAX_DEPTH (TooDeepError, a ValueError)."""
    try:
        data = json.loads(text, **kwargs)
    except RecursionError:
        raise TooDeepError(f"nested too deeply (more than {MAX_DEPTH} levels of [ and {{)") from None
    if depth(data) > MAX_DEPTH:
        raise TooDeepError(f"nested too deeply (more than {MAX_DEPTH} levels of [ and {{)")
    return data


def depth(data: Any) -> int:
    """How deeply lists and objects nest in `data` (iterative: never recurses)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in item if isinstance(child, (dict, list)))
    return deepest
