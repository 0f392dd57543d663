"""Layers import only downwards: models knows nothing of index/service, index nothing of
service, and no package imports itself in a loop (function-level imports count)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "index", "service")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _target(name: str) -> str | None:
    """The longest known module that `name` names (a.b.c -> a.b when c is an attribute)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(mod: str, path: Path) -> set[str]:
    """Modules `mod` imports anywhere in its body, functions included. Imports under
    `if TYPE_CHECKING:` are left out: they never run, so they cannot form a runtime cycle."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.update(t for a in node.names if (t := _target(a.name)))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = mod.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_pkg else 0)]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                if t := _target(f"{base}.{a.name}" if base else a.name):
                    out.add(t)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    out.discard(mod)
    return out


GRAPH = {mod: _imports(mod, path) for mod, path in MODULES.items()}


def _layer(mod: str) -> str:
    return mod.split(".")[0]


def _cycles(pkg: str) -> list[list[str]]:
    """Strongly connected components with more than one module, within `pkg` (Tarjan)."""
    nodes = [m for m in GRAPH if _layer(m) == pkg]
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(GRAPH[v]):
            if _layer(w) != pkg:
                continue
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in nodes:
        if v not in index:
            strong(v)
    return found


def _upward(low: str, high: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{m} -> {t}"
        for m, ts in GRAPH.items()
        if _layer(m) == low
        for t in ts
        if _layer(t) in high
    )


def test_the_graph_sees_the_packages() -> None:
    assert {"models", "index", "service"} <= set(MODULES)
    assert "index.multivector" in GRAPH["index.qbnorm"]  # imported inside a function today


def test_models_imports_neither_index_nor_service() -> None:
    assert _upward("models", ("index", "service")) == []


def test_index_does_not_import_service() -> None:
    assert _upward("index", ("service",)) == []


def test_no_import_cycle_in_models() -> None:
    assert _cycles("models") == []


def test_no_import_cycle_in_index() -> None:
    assert _cycles("index") == []


def test_no_import_cycle_in_service() -> None:
    assert _cycles("service") == []
