"""The rooms stay honest: relay_train's and the orchestrator's import graph, read from the source with
`ast` (nothing is imported).

Every import counts, including those inside functions (they run too, only later), except those under
`if TYPE_CHECKING:` in the cycle check (they never run). The orchestrator's rooms stack
core < services < run < ops < cli: a room imports only the rooms below it, even for a type.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = (ROOT / "relay_train", ROOT / "orchestrator")
ROOMS = ("core", "services", "run", "ops", "cli")  # orchestrator's rooms, lowest first


@dataclass(frozen=True)
class Import:
    module: str  # the module doing the importing, e.g. relay_train.data.encode
    target: str  # the module imported, as specific as the source allows, e.g. relay_train.data.caches
    line: int
    typing_only: bool  # under `if TYPE_CHECKING:`

    @property
    def where(self) -> str:
        return f"{module_file(self.module).relative_to(ROOT)}:{self.line}"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_file(name: str) -> Path:
    base = ROOT.joinpath(*name.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def source_files() -> list[Path]:
    return sorted(p for package in PACKAGES for p in package.rglob("*.py") if "__pycache__" not in p.parts)


MODULES = {module_name(p): p for p in source_files()}


def _typing_only_lines(tree: ast.Module) -> set[int]:
    """Lines inside `if TYPE_CHECKING:` / `if typing.TYPE_CHECKING:` blocks."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    """The absolute module a `from ... import` names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    anchor = parts if is_package else parts[:-1]
    anchor = anchor[: len(anchor) - (node.level - 1)]
    return ".".join(anchor + ([node.module] if node.module else []))


def imports_of(source: str, module: str, is_package: bool = False) -> Iterator[Import]:
    """Every import in `source` (the text of `module`), at any depth: module level, in functions, in classes."""
    tree = ast.parse(source)
    typing_only = _typing_only_lines(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, alias.name, node.lineno, node.lineno in typing_only)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node, is_package)
            for alias in node.names:
                # `from relay_train import checkpoint` imports the module relay_train.checkpoint
                sub = f"{base}.{alias.name}"
                yield Import(module, sub if sub in MODULES else base, node.lineno, node.lineno in typing_only)


IMPORTS = [
    imp
    for name, path in MODULES.items()
    for imp in sorted(imports_of(path.read_text(), name, path.name == "__init__.py"), key=lambda imp: imp.line)
]


def top(name: str) -> str:
    return name.partition(".")[0]


def assert_no_imports(rule: str, wanted, modules=lambda module: True) -> None:
    """Fails, naming each `file:line: module imports target`, when a module `modules` accepts imports a
    target `wanted` accepts."""
    __tracebackhide__ = True
    found = [f"  {imp.where}: {imp.module} imports {imp.target}" for imp in IMPORTS if wanted(imp.target) and modules(imp.module)]
    if found:
        pytest.fail(f"{rule}:\n" + "\n".join(found))


# ---------------------------------------------------------------- cycles


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A shortest cycle in the graph, as [a, b, ..., a], or None: a breadth-first search from each node
    for the shortest way back to it."""
    best: list[str] | None = None
    for start in sorted(graph):
        parents: dict[str, str] = {}
        frontier, last = [start], None
        while frontier and last is None:
            following = []
            for node in frontier:
                if start in graph.get(node, ()):
                    last = node
                    break
                for succ in sorted(graph.get(node, ())):
                    if succ not in parents and succ != start:
                        parents[succ] = node
                        following.append(succ)
            frontier = following
        if last is None:
            continue
        back = [last]
        while back[-1] != start:
            back.append(parents[back[-1]])
        cycle = [*reversed(back), start]
        if best is None or len(cycle) < len(best):
            best = cycle
    return best


def tangles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with a cycle: sets of modules that all reach each other."""
    reach = {}
    for start in graph:
        seen, todo = set(), [start]
        while todo:
            for succ in graph.get(todo.pop(), ()):
                if succ not in seen:
                    seen.add(succ)
                    todo.append(succ)
        reach[start] = seen
    found = {frozenset(m for m in graph if m in reach[n] and n in reach[m]) for n in graph if n in reach[n]}
    return sorted(sorted(tangle) for tangle in found)


def import_graph() -> tuple[dict[str, set[str]], dict[tuple[str, str], str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    where: dict[tuple[str, str], str] = {}
    for imp in IMPORTS:
        if imp.typing_only or imp.target not in MODULES or imp.target == imp.module:
            continue
        graph[imp.module].add(imp.target)
        where.setdefault((imp.module, imp.target), imp.where)
    return graph, where


def test_neither_package_has_import_cycles():
    graph, where = import_graph()
    report = []
    for tangle in tangles(graph):
        cycle = find_cycle({m: graph[m] & set(tangle) for m in tangle}) or []
        report.append(f"{len(tangle)} modules import each other: {', '.join(tangle)}; a shortest cycle:")
        report += [f"  {a} -> {b}  ({where[a, b]})" for a, b in zip(cycle, cycle[1:])]
    if report:
        pytest.fail("import cycles:\n" + "\n".join(report))


def test_the_cycle_finder_reports_each_tangle_and_a_shortest_cycle():
    graph = {"a": {"b"}, "b": {"c", "a"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    two_tangles = {"a": {"b"}, "b": {"a", "c"}, "c": {"d"}, "d": {"e"}, "e": {"c"}}
    assert tangles(two_tangles) == [["a", "b"], ["c", "d", "e"]]


# ---------------------------------------------------------------- what may import what


def test_only_the_cli_parses_arguments():
    clis = ("relay_train.cli", "orchestrator.cli")
    assert_no_imports("argparse outside the two cli.py", lambda t: top(t) == "argparse", lambda m: m not in clis)


def room(module: str) -> int | None:
    """The orchestrator room's rank in ROOMS (orchestrator.run.launch → 2), None outside one."""
    parts = module.split(".")
    if parts[0] != "orchestrator" or len(parts) < 2 or parts[1] not in ROOMS:
        return None
    return ROOMS.index(parts[1])


def test_an_orchestrator_room_imports_only_the_rooms_below_it():
    found = [
        f"  {imp.where}: {imp.module} ({ROOMS[room(imp.module)]}/) imports {imp.target} ({ROOMS[room(imp.target)]}/)"
        for imp in IMPORTS
        if room(imp.module) is not None and room(imp.target) is not None and room(imp.target) > room(imp.module)
    ]
    if found:
        pytest.fail("a room imports a room above it (order: " + " < ".join(ROOMS) + "):\n" + "\n".join(found))


def test_the_room_reader_knows_the_order():
    assert [room(m) for m in ("orchestrator.core.store", "orchestrator.ops.spot", "orchestrator.cli", "orchestrator")] == [
        0,
        3,
        4,
        None,
    ]
    assert {room(m) for m in MODULES if m.startswith("orchestrator.")} == set(range(len(ROOMS)))


def test_the_data_room_does_not_reach_up_into_the_cli_or_the_trainer():
    above = ("relay_train.cli", "relay_train.trainer")
    assert_no_imports(
        "relay_train/data imports the CLI or the trainer",
        lambda t: t in above,
        lambda m: m == "relay_train.data" or m.startswith("relay_train.data."),
    )


def test_relay_train_stores_through_pyarrow_not_boto():
    assert_no_imports(
        "boto3/botocore in relay_train", lambda t: top(t) in ("boto3", "botocore"), lambda m: top(m) == "relay_train"
    )


def test_relay_train_knows_nothing_of_the_orchestrator():
    assert_no_imports(
        "relay_train imports the orchestrator", lambda t: top(t) == "orchestrator", lambda m: top(m) == "relay_train"
    )


def test_every_subpackage_has_an_init_with_a_docstring():
    folders = sorted({p.parent for p in source_files()})
    missing = [str(f.relative_to(ROOT)) for f in folders if not (f / "__init__.py").is_file()]
    undocumented = [
        str(f.relative_to(ROOT))
        for f in folders
        if (f / "__init__.py").is_file() and not ast.get_docstring(ast.parse((f / "__init__.py").read_text()))
    ]
    assert (missing, undocumented) == ([], [])


def test_the_reader_sees_imports_at_any_depth_and_resolves_relative_ones():
    source = (
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING\n"
        "from . import caches\n"
        "from .store import FileStore\n"
        "from relay_train import checkpoint as ckpt\n"
        "if TYPE_CHECKING:\n"
        "    from relay_train.trainer import Trainer\n"
        "def run():\n"
        "    import argparse\n"
        "    from ..cli import main\n"
        "class Later:\n"
        "    def build(self):\n"
        "        import boto3.session\n"
    )
    found = [(imp.target, imp.line, imp.typing_only) for imp in imports_of(source, "relay_train.data.encode")]
    assert sorted(found) == sorted(
        [
            ("__future__", 1, False),
            ("typing", 2, False),
            ("relay_train.data.caches", 3, False),
            ("relay_train.data.store", 4, False),
            ("relay_train.checkpoint", 5, False),
            ("relay_train.trainer", 7, True),
            ("argparse", 9, False),
            ("relay_train.cli", 10, False),
            ("boto3.session", 13, False),
        ]
    )
    in_package = [imp.target for imp in imports_of("from .caches import T5_TOKENS", "relay_train.data", is_package=True)]
    assert in_package == ["relay_train.data.caches"]
