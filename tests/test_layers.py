"""The package's modules form layers: no import circle, counting imports inside functions, and every
module imports on its own."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules() -> dict[str, Path]:
    mods = {}
    for f in sorted((SRC / "transferlab").rglob("*.py")):
        name = ".".join(f.relative_to(SRC).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = f
    return mods


def _imported(module: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The transferlab modules `module` imports anywhere in its body (functions included), except under
    `if TYPE_CHECKING:`, which never runs."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                 for n in ast.walk(node)}
    targets = set()
    for node in ast.walk(tree):
        if id(node) in type_only or not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([base] if base else [])])
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        for name in names:
            while name not in mods and "." in name:
                name = name.rpartition(".")[0]
            if name in mods and name != module and name.startswith("transferlab"):
                targets.add(name)
    return targets


def _circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_counting_imports_inside_functions():
    mods = _modules()
    edges = {m: _imported(m, p, mods) for m, p in mods.items()}
    circles = _circles(edges)
    detail = "; ".join(" -> ".join(f"{m} imports {sorted(edges[m] & set(c))}" for m in c) for c in circles)
    assert not circles, f"import circles: {detail}"


def test_the_check_sees_a_circle_hidden_in_a_function():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _circles(edges) == [["a", "b", "c"]]


@pytest.mark.parametrize("module", sorted(m for m in _modules() if m != "transferlab.__main__"))
def test_every_module_imports_on_its_own(module):
    saved = {k: v for k, v in sys.modules.items() if k == "transferlab" or k.startswith("transferlab.")}
    for k in saved:
        del sys.modules[k]
    try:
        importlib.import_module(module)
    finally:
        for k in [k for k in sys.modules if k == "transferlab" or k.startswith("transferlab.")]:
            del sys.modules[k]
        sys.modules.update(saved)
