"""The package's modules form layers: none imports from a layer above its own, there is no import circle
(imports inside functions counted), and every module imports on its own."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first. A module may import from its own layer and the layers below, never from one above. A name
# claims a module or a whole subpackage (relative to transferlab; "" is the package itself); the longest
# claim wins, so one module can sit above the rest of its folder.
LAYERS: list[tuple[str, ...]] = [
    ("_version", "errors", "_testing", "_runtime", "io", "paths", "network", "logs"),
    ("data",),
    ("models",),
    ("config", "run_dir"),
    ("recipes",),
    ("training",),
    ("evaluation",),
    ("reporting", "export"),
    ("classifier",),
    # training.run is the train workflow (it ends by evaluating, writing the report and returning a
    # Classifier), and training.lr_find_run the lr-find workflow built from its stages
    ("workflows", "training.run", "training.lr_find_run"),
    ("api",),
    ("cli",),
    ("", "__main__"),
]


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


def _layer(module: str) -> int | None:
    """The index in LAYERS of the longest claim on `module`; None when nothing claims it."""
    rel = module.removeprefix("transferlab").removeprefix(".")
    claims = [(len(claim), i) for i, names in enumerate(LAYERS) for claim in names
              if rel == claim or (claim and rel.startswith(f"{claim}."))]
    return max(claims)[1] if claims else None


def _upward(edges: dict[str, set[str]]) -> list[str]:
    """Every import of a module from a layer above its own, as 'a imports b (layer i < j)'."""
    found = []
    for module in sorted(edges):
        for target in sorted(edges[module]):
            low, high = _layer(module), _layer(target)
            if low is not None and high is not None and high > low:
                found.append(f"{module} imports {target} (layer {low} < {high}: {LAYERS[high]})")
    return found


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


def test_every_module_has_a_layer():
    unclaimed = sorted(m for m in _modules() if _layer(m) is None)
    assert not unclaimed, f"place these modules in LAYERS: {unclaimed}"


def test_no_module_imports_from_a_layer_above_its_own():
    mods = _modules()
    upward = _upward({m: _imported(m, p, mods) for m, p in mods.items()})
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_the_layer_check_names_an_import_hidden_in_a_function(tmp_path):
    source = tmp_path / "lister.py"
    source.write_text("def f():\n    from transferlab.training import run\n    return run\n", encoding="utf-8")
    mods = {**_modules(), "transferlab.data.lister": source}
    edges = {"transferlab.data.lister": _imported("transferlab.data.lister", source, mods)}
    assert edges["transferlab.data.lister"] == {"transferlab.training.run"}
    run_layer = _layer("transferlab.training.run")
    expected = f"transferlab.data.lister imports transferlab.training.run (layer 1 < {run_layer}: {LAYERS[run_layer]})"
    assert _upward(edges) == [expected]


def test_a_longer_claim_lifts_one_module_above_its_folder():
    assert _layer("transferlab.training.memory") < _layer("transferlab.classifier") < _layer("transferlab.training.run")
    assert _layer("transferlab") == len(LAYERS) - 1 and _layer("transferlab.nowhere") is None


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
