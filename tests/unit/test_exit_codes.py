"""One exit-code table (relay_train/exit_codes.py): every number one meaning, the README held to it, and
the commands return its names, never a bare number."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from relay_train.exit_codes import COMMANDS, MEANING, Exit, by_signal, markdown

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_every_code_has_one_meaning_and_every_command_uses_the_table():
    assert set(MEANING) == set(Exit) and len({int(c) for c in Exit}) == len(Exit)
    assert all(MEANING[c] and "\n" not in MEANING[c] for c in Exit)
    assert by_signal(2) is Exit.SIGINT and by_signal(15) is Exit.SIGTERM
    assert all(set(codes) <= set(Exit) for codes in COMMANDS.values())


def test_the_readme_shows_the_table():
    assert markdown() in README, "README's 'Exit codes' table differs: paste `python -m relay_train.exit_codes`"


def _command_rows() -> dict[str, str]:
    """README's Commands table: the first cell's command → the whole row."""
    table = README.split("## Commands", 1)[1].split("\n\n", 2)[1]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    return {row.split("`")[1]: row for row in rows}


def _key(command: str) -> str | None:
    keys = [k for k in COMMANDS if k.split()[-1] in command.split() or k in command]
    return max(keys, key=len) if keys else None


def test_each_commands_row_lists_the_codes_the_table_gives_it():
    rows = _command_rows()
    seen = set()
    for command, row in rows.items():
        key = _key(command)
        listed = re.search(r"Exit codes: ((?:\d+(?: \([^)]*\))?(?:, )?)+)", row)
        assert key and listed, f"README row {command!r}: no 'Exit codes: ...' or no entry in COMMANDS"
        codes = [int(n) for n in re.findall(r"(?:^|, )(\d+)", listed.group(1))]
        assert codes == sorted(int(c) for c in COMMANDS[key]), (command, codes)
        seen.add(key)
    assert "`--kuberay` runs the job in-process for a RayJob, with the exit codes of `relay launch`" in README
    assert COMMANDS["relay supervise --kuberay"] == COMMANDS["relay launch"] == COMMANDS["jobs/train.py"]
    assert seen == set(COMMANDS) - {"relay supervise --kuberay"}


ENTRY_POINTS = [
    "relay_train/cli.py",
    "orchestrator/cli.py",
    "orchestrator/run/launch.py",
    "orchestrator/ops/supervise.py",
    *(str(p.relative_to(ROOT)) for p in sorted((ROOT / "jobs").glob("*.py"))),
]


def _is_command(function: ast.FunctionDef) -> bool:
    return function.name.startswith("cmd_") or function.name in ("main", "run", "run_job", "supervise")


def test_commands_return_the_tables_names_not_numbers():
    bare = []
    for name in ENTRY_POINTS:
        tree = ast.parse((ROOT / name).read_text())
        for function in (f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and _is_command(f)):
            for node in ast.walk(function):
                value = getattr(node, "value", None) if isinstance(node, ast.Return) else None
                if isinstance(value, ast.Constant) and type(value.value) is int:
                    bare.append(f"{name}:{node.lineno}: return {value.value}")
    assert not bare, "return an Exit member (relay_train/exit_codes.py):\n" + "\n".join(bare)
