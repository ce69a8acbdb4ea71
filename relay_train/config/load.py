"""Reading a SimpleTuner-style config into a TrainConfig, once, at the edge.

`load_config("configs/sd3/config.json")` reads the JSON (keys written `"--key"` or bare), applies
overrides, renames legacy keys, validates every value and the rules between them, finds the files it
points at (LyCORIS config, multidatabackend.json, webhook.json) and loads them. Every problem found on
the way is reported together in one ConfigError.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from relay_train.config import compat
from relay_train.config.files import load_backends, load_lycoris, load_webhook, read_json, resolve_file
from relay_train.config.problems import (
    ConfigError,
    Where,
    built,
    field_problems,
    unknown_key_problem,
    validate_field,
    with_defaults,
)
from relay_train.config.schema import KEY_ALIASES, USER_KEYS, TrainConfig, canonical_key
from relay_train.redaction import is_secret_key, secrets_in

__all__ = ["load_config", "parse_config"]

logger = logging.getLogger(__name__)

_FILE_KEYS: dict[str, tuple[str, ...]] = {
    "lycoris_config": (".json", ".conf"),  # the model card names it both ways
    "data_backend_config": (),
    "webhook_config": (),
    "init_lora": (),
    "validation_prompt_file": (".json", ".txt"),
}


def _same(key: str, a: Any, b: Any) -> bool:
    if a == b:
        return True
    first, errors_a = validate_field(TrainConfig, key, a, key)
    second, errors_b = validate_field(TrainConfig, key, b, key)
    return not errors_a and not errors_b and first == second


class _Read:
    """What reading the raw keys found besides the values: renamed keys and refused-but-matching options."""

    def __init__(self) -> None:
        self.renamed: list[tuple[str, str]] = []
        self.matched: list[tuple[str, Any]] = []
        self.spelled: dict[str, str] = {}  # field -> the key as written, for messages

    def as_written(self, problem: str) -> str:
        """A field's problem named by the key the user wrote ('--checkpointing_steps', not its new name)."""
        name = problem[3:].split("'", 1)[0] if problem.startswith("'--") else ""
        written = self.spelled.get(name)
        return problem.replace(f"'--{name}'", f"'{written}'", 1) if written and written != f"--{name}" else problem


def _refusal(key: str, name: str, value: Any, read: _Read) -> str | None:
    """The problem for a SimpleTuner option or value Relay refuses; None when the key may go on."""
    if name not in USER_KEYS and compat.refused_group(name):
        if compat.matches_relay(name, value):
            read.matched.append((name, value))
            return ""
        return compat.refused_problem(name, f"'{key}'")
    return compat.refused_value_problem(name, value, f"'{key}'")


def _canonical(raw: Mapping[str, Any], problems: list[str], read: _Read) -> dict[str, Any]:
    """Strip '--', apply the aliases, refuse what Relay does not implement, report unknown keys (with a
    suggestion only among keys that accept the value) and conflicting spellings."""
    values: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            problems.append(f"key {key!r} is not a string")
            continue
        bare = key.removeprefix("--")
        if bare in compat.NEGATED_ALIASES:
            parsed, errors = validate_field(TrainConfig, compat.NEGATED_ALIASES[bare], value, f"'{key}'")
            bare, value = compat.NEGATED_ALIASES[bare], (not parsed if not errors else value)
            read.renamed.append((key, bare))
        name = canonical_key(bare) or bare
        refusal = _refusal(key, name, value, read)
        if refusal is not None:
            problems.extend([refusal] if refusal else [])
            continue
        if name not in USER_KEYS:
            problems.append(
                unknown_key_problem(
                    key,
                    USER_KEYS,
                    Where(dashes="--"),
                    KEY_ALIASES,
                    fits=lambda k, v=value: not validate_field(TrainConfig, k, v, k)[1],
                )
            )
            continue
        if bare in KEY_ALIASES:
            read.renamed.append((key, name))
        if isinstance(value, str) and value.strip().lower() in compat.VALUE_ALIASES.get(name, {}):
            mapped = compat.VALUE_ALIASES[name][value.strip().lower()]
            read.renamed.append((f"{key}={value}", f"{name}={mapped}"))
            value = mapped
        if name in values and not _same(name, values[name], value):
            problems.append(
                f"'{spelled[name]}' and '{key}' both set '--{name}', to {values[name]!r} and {value!r}: keep only '--{name}'"
            )
            continue
        values.setdefault(name, value)
        spelled.setdefault(name, key)
    for name, key in spelled.items():
        read.spelled[name] = key if key.startswith("--") else f"--{key}" if key == name else key
    return values


def _resolve_files(good: dict[str, Any], base_dir: Path, problems: list[str]) -> None:
    for key, suffixes in _FILE_KEYS.items():
        if not isinstance(good.get(key), Path):  # absent, or inline JSON (webhook_config)
            continue
        found, tried = resolve_file(good[key], base_dir, suffixes)
        if found is None and is_secret_key(key):  # never its value, nor a form of it (a place tried ends with it)
            good.pop(key)
            problems.append(f"'--{key}': the file it names was not found, as given or beside the config (value hidden)")
        elif found is None:
            places = ", ".join(str(p) for p in tried)
            problems.append(f"'--{key}': file {str(good.pop(key))!r} not found; tried {places}")
        else:
            good[key] = found


_LOADERS = {
    "lycoris_config": ("lycoris", load_lycoris),
    "data_backend_config": ("data_backends", load_backends),
    "webhook_config": ("webhook", load_webhook),
}


def _load_files(good: Mapping[str, Any], problems: list[str]) -> dict[str, Any]:
    derived: dict[str, Any] = {}
    for key, (field, loader) in _LOADERS.items():
        if good.get(key) is not None:
            derived[field], found = loader(good[key])
            problems.extend(found)
    return derived


def _family_problem(values: Mapping[str, Any]) -> str | None:
    """Another model family's config is refused in one line: none of its other keys mean anything here."""
    family = values.get("model_family")
    if isinstance(family, str) and family.strip().lower() != "sd3":
        return f"SimpleTuner model family {family!r} is not supported by Terminus Relay: {compat.FAMILIES_WORDS}"
    return None


def _flavour_problems(good: dict[str, Any], read: _Read) -> list[str]:
    """model_flavour names the model when pretrained_model_name_or_path is unset, and must match it when both are."""
    flavour, model = good.get("model_flavour"), good.get("pretrained_model_name_or_path")
    if model is None:
        if flavour is None:
            about = (TrainConfig.model_fields["pretrained_model_name_or_path"].description or "").rstrip(".")
            return [f"missing required key '--pretrained_model_name_or_path' ({about})"]
        good["pretrained_model_name_or_path"] = compat.MODEL_FLAVOURS[flavour]
        read.renamed.append((f"--model_flavour={flavour}", f"pretrained_model_name_or_path={compat.MODEL_FLAVOURS[flavour]}"))
        return []
    if flavour is None:
        return []
    hub_ids = {v.lower(): k for k, v in compat.MODEL_FLAVOURS.items()}
    named = hub_ids.get(str(model).lower())
    transformer = Path(model).expanduser() / "transformer" / "config.json"
    if named is None and transformer.is_file():
        try:
            arch = json.loads(transformer.read_text(encoding="utf-8"))
            named = "medium" if arch.get("dual_attention_layers") else "large"
        except (ValueError, OSError, AttributeError):
            named = None
    if named is not None and named != flavour:
        return [
            (
                f"'--model_flavour': got {flavour!r}, but '--pretrained_model_name_or_path' {model!r} is an "
                f"SD3.5 {named.title()} model: set --model_flavour {named!r}, or remove it"
            )
        ]
    return []


def parse_config(
    raw: dict[str, Any], base_dir: Path, *, overrides: Mapping[str, Any] | None = None, source_path: Path | None = None
) -> TrainConfig:
    """Validate a SimpleTuner-style config dict; referenced files are looked up from base_dir."""
    if not isinstance(raw, dict):
        raise ConfigError([f"the config must be a JSON object of '--key': value, got {type(raw).__name__}"], source_path)
    secrets = secrets_in(raw) | secrets_in(dict(overrides or {}))
    problems: list[str] = []
    read = _Read()
    values = _canonical(raw, problems, read)
    if overrides:
        values.update(_canonical(overrides, problems, read))
    if family := _family_problem(values):
        raise ConfigError([family], source_path, secrets)
    good, errors = field_problems(TrainConfig, values, Where(dashes="--"), known=USER_KEYS)
    problems[:0] = _flavour_problems(good, read) if "pretrained_model_name_or_path" not in set(values) - set(good) else []
    if good.get("lora_type", "lycoris") == "lycoris" and "lycoris_config" not in values:
        good["lycoris_config"] = TrainConfig.model_fields["lycoris_config"].default  # SimpleTuner's default path
    problems += [read.as_written(e) for e in errors]
    problems += TrainConfig.cross_field_problems(with_defaults(TrainConfig, good), set(values) - set(good))
    _resolve_files(good, Path(base_dir), problems)
    derived = _load_files(good, problems)
    if problems:
        raise ConfigError(problems, source_path, secrets)
    config = built(TrainConfig, {**good, **derived, "source_path": source_path})
    config._renamed, config._matched = read.renamed, read.matched
    return config


def load_config(path: str | Path, overrides: Mapping[str, object] | None = None) -> TrainConfig:
    """Read, validate and resolve a SimpleTuner-style config.json; raises ConfigError."""
    path = Path(path)
    raw, problems = read_json(path)
    secrets = secrets_in(raw) | secrets_in(dict(overrides or {}))
    if raw is None:
        raise ConfigError(problems, path, secrets)
    try:
        config = parse_config(raw, path.parent, overrides=overrides, source_path=path)
    except ConfigError as exc:
        raise ConfigError(problems + exc.problems, path, secrets) from None
    if problems:
        raise ConfigError(problems, path, secrets)
    logger.debug("loaded training config from %s", path)
    return config
