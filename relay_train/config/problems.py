"""How a config problem is found and worded, for every config Relay reads: the training config and the
files it points at, and the cluster config.

Each value is validated by pydantic on its own, so one bad value never hides another, and each error
pydantic lists becomes one line naming the key, the value written (secrets hidden), what the key accepts
and so how to fix it. An unknown key is named with the nearest known key. All the lines found in one
config are raised together as one ConfigError.
"""

from __future__ import annotations

import difflib
import math
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import annotated_types as at
from pydantic import BaseModel, SecretStr, TypeAdapter, ValidationError, model_validator
from pydantic.fields import FieldInfo

from relay_train.redaction import environment_secrets, mask

HIDDEN = "<hidden>"
Model = TypeVar("Model", bound=BaseModel)


class ConfigModel(BaseModel):
    """A config's fields and the rules between them. The rules run once: for a model built in code, in the
    validator below; for a config read from a file, beside the problems of single values (the loader calls
    `cross_field_problems` itself, then builds the model with `built`, without validating it again)."""

    @classmethod
    def cross_field_problems(cls, values: Mapping[str, Any], bad: set[str]) -> list[str]:
        """Problems between fields; a rule is skipped when one of its keys is in `bad` (its value failed)."""
        return []

    @model_validator(mode="after")
    def _rules_hold(self) -> ConfigModel:
        if problems := self.cross_field_problems(self.__dict__, set()):
            raise ValueError("; ".join(problems))
        return self


class ConfigError(ValueError):
    """Every problem found in a config, one per line; `secrets` (webhook URLs, tokens) are masked in each."""

    def __init__(self, problems: list[str], source: str | Path | None = None, secrets: set[str] | None = None) -> None:
        hidden = (secrets or set()) | environment_secrets()  # as every log line masks them
        self.problems = [mask(p, hidden) for p in problems]
        head = f"{len(self.problems)} problem(s) in {source or 'the training config'}:"
        super().__init__("\n".join([head, *(f"  - {p}" for p in self.problems)]))


@dataclass(frozen=True)
class Where:
    """How problems in one file (or one entry of it) name their keys."""

    prefix: str = ""
    dashes: str = ""

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else f"'{self.dashes}{name}'"

    def line(self, text: str) -> str:
        return f"{self.prefix}: {text}" if self.prefix else text


def unknown_key_problem(
    key: str,
    known: Iterable[str],
    where: Where,
    aliases: Mapping[str, str] | None = None,
    fits: Callable[[str], bool] | None = None,
) -> str:
    """One line naming an unknown key and, when one is close, the key probably meant. With `fits`, a
    key is suggested only if it would accept the value written (a key of the same kind): a device name
    is never steered to a decay rate."""
    aliases = aliases or {}
    bare = key.lstrip("-")
    style = key[: len(key) - len(bare)]
    candidates = [*known, *aliases]
    if fits is not None:
        candidates = [c for c in candidates if fits(aliases.get(c, c))]
    matches = difflib.get_close_matches(bare, candidates, n=1, cutoff=0.6)
    text = f"unknown key '{key}'"
    if matches:
        text += f": did you mean '{style}{aliases.get(matches[0], matches[0])}'?"
    else:
        text += ": not a recognised option"
    return where.line(text)


def show_value(value: Any, hidden: bool = False) -> str:
    if hidden:
        return repr(HIDDEN)
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_secret(annotation: Any) -> bool:
    return annotation is SecretStr or any(_is_secret(a) for a in get_args(annotation))


def _is_union(annotation: Any) -> bool:
    return get_origin(annotation) in (Union, types.UnionType)


def _without_none(annotation: Any) -> tuple[Any, bool]:
    if _is_union(annotation):
        rest = [a for a in get_args(annotation) if a is not type(None)]
        if len(rest) < len(get_args(annotation)):
            return (rest[0] if len(rest) == 1 else Union[tuple(rest)]), True  # noqa: UP007 (built at run time)
    return annotation, False


def _type_words(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Literal:
        return "expected one of " + ", ".join(repr(a) for a in get_args(annotation))
    simple = {
        bool: "expected true or false",
        int: "must be an integer",
        float: "must be a number",
        str: "must be a string",
        SecretStr: "must be a string",
        Path: "must be a path",
    }
    if annotation in simple:
        return simple[annotation]
    if origin is dict or annotation is dict:
        return "must be a JSON object"
    if origin is list or annotation is list:
        return "must be a JSON list"
    if origin is tuple:
        return f"must be a JSON list of {len(get_args(annotation))} values"
    if _is_union(annotation):
        kinds = [
            _type_words(a).removeprefix("must be ").removeprefix("expected one of ").removeprefix("expected ")
            for a in get_args(annotation)
        ]
        return "must be " + ", or ".join(kinds)
    return "has the wrong type"


def _bound_words(metadata: Iterable[Any]) -> str:
    words = {at.Ge: (">=", "ge"), at.Gt: (">", "gt"), at.Le: ("<=", "le"), at.Lt: ("<", "lt")}
    parts = [f"{words[type(m)][0]} {getattr(m, words[type(m)][1]):g}" for m in metadata if type(m) in words]
    return (" " + " and ".join(parts)) if parts else ""


def expectation(field: FieldInfo) -> str:
    """What a field accepts, in words: 'must be an integer >= 1', "expected one of 'a', 'b'"."""
    base, nullable = _without_none(field.annotation)
    text = _type_words(base) + _bound_words(field.metadata)
    return text + " (or null)" if nullable else text


@cache
def _adapter(model: type[BaseModel], name: str) -> TypeAdapter:
    field = model.model_fields[name]
    if field.metadata:
        return TypeAdapter(Annotated[(field.annotation, *field.metadata)])
    return TypeAdapter(field.annotation)


def _numeric(annotation: Any) -> bool:
    base, _ = _without_none(annotation)
    return base in (int, float)


def _error_line(field: FieldInfo, label: str, value: Any, error: Mapping[str, Any]) -> str:
    got = show_value(value, _is_secret(field.annotation))
    loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"])
    if loc:
        return f"{label}{loc}: got {show_value(error['input'])}; {error['msg']}"
    if error["type"] == "value_error":
        return f"{label}: got {got}; {error['ctx']['error']!s}"
    if error["type"] == "missing":
        return f"{label}: is required ({(field.description or '').rstrip('.')})"
    return f"{label}: got {got}; {expectation(field)}"


FLOAT32_MAX = 3.4028234663852886e38  # every number trains in fp32 tensors: a bigger one overflows to inf there
INT64_MAX = 2**63 - 1  # torch and numpy take integers as int64 ("Overflow when unpacking long long")


def _out_of_range(value: Any) -> str | None:
    """Why a parsed value cannot be used as a number on the machine, or None: NaN and ±inf are never a
    sane setting (JSON's Infinity and NaN parse to them), nor a float past fp32's range or an int past int64."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return "must be a finite number"
        return "must fit a 32-bit float (at most 3.4e38 in size)" if abs(value) > FLOAT32_MAX else None
    if isinstance(value, int) and not isinstance(value, bool):
        return f"must fit a 64-bit integer (at most {INT64_MAX} in size)" if abs(value) > INT64_MAX else None
    if isinstance(value, (list, tuple)):
        return next((p for p in map(_out_of_range, value) if p), None)
    if isinstance(value, dict):
        return next((p for p in map(_out_of_range, value.values()) if p), None)
    return None


def validate_field(model: type[BaseModel], name: str, value: Any, label: str) -> tuple[Any, list[str]]:
    """Validate one field on its own, so one bad value never hides another."""
    field = model.model_fields[name]
    if isinstance(value, bool) and _numeric(field.annotation):
        return None, [f"{label}: got {value!r}; {expectation(field)}"]
    try:
        parsed = _adapter(model, name).validate_python(value)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if _is_union(_without_none(field.annotation)[0]) and any(e["loc"] for e in errors):
            # pydantic lists why each kind the field takes failed: say once what it takes
            return None, [f"{label}: got {show_value(value, _is_secret(field.annotation))}; {expectation(field)}"]
        lines = [_error_line(field, label, value, e) for e in errors]
        return None, list(dict.fromkeys(lines))
    if problem := _out_of_range(parsed):
        shown = show_value(value, _is_secret(field.annotation))
        return None, [f"{label}: got {shown}; {problem} ({expectation(field).removeprefix('must be ')})"]
    return parsed, []


def field_problems(
    model: type[BaseModel], data: Mapping[str, Any], where: Where, known: Iterable[str] | None = None
) -> tuple[dict[str, Any], list[str]]:
    """Validate every key of data against model's fields: the valid values and every problem."""
    known = list(known if known is not None else model.model_fields)
    forbid = model.model_config.get("extra") == "forbid"
    good: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in data.items():
        if key not in model.model_fields:
            if forbid:
                problems.append(unknown_key_problem(key, known, where))
            else:
                good[key] = value
            continue
        parsed, errors = validate_field(model, key, value, where.key(key))
        problems.extend(errors)
        if not errors:
            good[key] = parsed
    for name in known:
        if model.model_fields[name].is_required() and name not in data:
            about = (model.model_fields[name].description or "").rstrip(".")
            problems.append(where.line(f"missing required key '{where.dashes}{name}' ({about})"))
    return good, problems


def with_defaults(model: type[BaseModel], good: Mapping[str, Any]) -> dict[str, Any]:
    """The valid values plus every field's default, for cross-field checks."""
    merged = {n: f.get_default(call_default_factory=True) for n, f in model.model_fields.items() if not f.is_required()}
    return merged | dict(good)


def built(model: type[Model], good: Mapping[str, Any]) -> Model:
    """The model made from values `field_problems` accepted and whose cross-field rules already passed:
    pydantic does not validate them a second time."""
    return model.model_construct(**good)
