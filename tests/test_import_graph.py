"""The package's shape, read from its source: no import cycle between hae_cli's parts (lazy
imports inside functions count: they are cycles the interpreter only defers), and the runtime
never imports the test and training fixtures (`hae_testing`)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "hae_cli"


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def _imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The modules `path` imports, at any depth of its code; `from pkg import sub` names `pkg.sub`."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return out


def _part(module: str) -> str:
    """hae_cli.X: a top-level module or subpackage, the unit a cycle is counted between."""
    return ".".join(module.split(".")[:2])


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle in `edges`, or None (depth-first, colouring)."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start)):
            return found
    return None


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {module: _imports(path, known) for module, path in known.items()}


def test_no_import_cycle_between_the_packages_parts():
    parts: dict[str, set[str]] = defaultdict(set)
    for module, targets in _graph().items():
        for target in targets:
            if target.startswith("hae_cli.") and _part(target) != _part(module):
                parts[_part(module)].add(_part(target))
    assert _cycle(parts) is None, " -> ".join(_cycle(parts))


def test_no_import_cycle_between_modules():
    edges = {module: {t for t in targets if t.startswith("hae_cli.") and not module.startswith(t + ".")}
             for module, targets in _graph().items()}  # a module importing its own package is not a cycle back
    assert _cycle(edges) is None, " -> ".join(_cycle(edges))


def test_the_runtime_never_imports_the_test_fixtures():
    offenders = {module for module, targets in _graph().items() if any(t.split(".")[0] == "hae_testing" for t in targets)}
    assert not offenders, sorted(offenders)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}}) is None
