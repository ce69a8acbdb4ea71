"""Config keys on the command line, as SimpleTuner takes them: `--key=value`, `--key value`, or a bare
`--flag` (true), besides `--set key=value`. Every entry point (`relay train`, `relay launch`,
jobs/train.py) reads them through `flag_pairs`, so an unknown flag meets the same all-at-once check
as an unknown key in config.json."""

from __future__ import annotations

from typing import Any

from relay_train import json_text
from relay_train.config.problems import ConfigError

COMMAND_LINE = "the command line"


def add_set_flag(parser: Any, flag: str = "--set", what: str = "config") -> None:
    """`--set KEY=VALUE` (or `--cluster-set`, what="cluster"), repeatable, on a command (an argparse parser);
    the pairs are read by config_overrides or parse_overrides. Argument parsing itself stays in the CLIs."""
    parser.add_argument(flag, action="append", default=[], metavar="KEY=VALUE", help=f"override a {what} key")


def flag_pairs(argv: list[str]) -> list[str]:
    """['--max_train_steps=10', '--init_lora', 'a.safetensors', '--use_ema'] ->
    ['--max_train_steps=10', '--init_lora=a.safetensors', '--use_ema=true']: `--set`'s KEY=VALUE form.

    A word that follows no flag is an error; a flag followed by another flag (or nothing) is true."""
    pairs, problems = [], []
    index = 0
    while index < len(argv):
        word = argv[index]
        index += 1
        if not word.startswith("--") or word == "--":
            problems.append(f"unexpected argument {word!r}: pass config keys as --key=value or --key value")
            continue
        key, sep, value = word[2:].partition("=")
        if not sep:
            if index < len(argv) and not argv[index].startswith("--"):
                value, index = argv[index], index + 1
            else:
                value = "true"
        pairs.append(f"--{key}={value}")
    if problems:
        raise ConfigError(problems, COMMAND_LINE)
    return pairs


def parse_overrides(pairs: list[str]) -> dict[str, object]:
    """KEY=VALUE pairs -> overrides; a value is parsed as JSON when it can be (numbers, true/false, lists),
    else kept as a string."""
    overrides: dict[str, object] = {}
    problems = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            problems.append(f"--set expects key=value, got {pair!r}")
            continue
        try:
            overrides[key] = json_text.loads(value)
        except ValueError:
            overrides[key] = value
    if problems:
        raise ConfigError(problems, COMMAND_LINE)
    return overrides


def config_overrides(sets: list[str], argv: list[str]) -> dict[str, object]:
    """The overrides of `--set KEY=VALUE` (each) and of SimpleTuner-style flags; a flag wins over a --set
    of the same spelling."""
    return parse_overrides([*sets, *flag_pairs(argv)])
