"""Recipes: the classic transfer-learning experiments as data (YAML shipped in this package).

A recipe names a public dataset and its split mapping, the settings of a ``train`` run (TrainConfig
fields) or of a ``compare`` grid (backbones × strategies plus shared TrainConfig fields), and the figures
its source published. Running one goes through the ordinary ``train``/``compare`` machinery
(:mod:`transferlab.workflows.recipe`); nothing here trains.

    transferlab recipe list
    transferlab recipe show flowers102-resnet50 --override epochs_finetune=4
    transferlab recipe run flowers102-resnet50 --data-root ~/datasets
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from transferlab.errors import TransferlabError
from transferlab.run_dir import RunDir, best_val_accuracy

__all__ = ["KINDS", "METRICS", "Recipe", "RecipeError", "list_recipes", "load_recipe", "measured", "resolve_recipe"]

KINDS = ("train", "compare")
ALL_TORCHVISION = "all-torchvision"
RECIPE_FILE = "recipe.json"  # written into a recipe's run directory (and each compare cell)


class RecipeError(TransferlabError):
    """A recipe is unknown, malformed, or an override does not apply to it."""


@dataclass
class Recipe:
    """One experiment: dataset + settings + the figures to compare against."""

    name: str
    title: str
    kind: str  # "train" | "compare"
    dataset: dict[str, Any]  # {"name": DATASETS key, "splits": {ours: [theirs]}}
    config: dict[str, Any]  # TrainConfig fields (train: the run; compare: shared by every cell)
    compare: dict[str, Any] = field(default_factory=dict)  # {"backbones": [...] | "all-torchvision", "strategies": [...]}
    source: dict[str, Any] = field(default_factory=dict)
    published: list[dict[str, Any]] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)  # as given on the command line, once resolved

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def backbones(self) -> list[str]:
        """The compare grid's backbones ('all-torchvision' expanded to every torchvision classifier)."""
        value = self.compare.get("backbones", [])
        items = value.split(",") if isinstance(value, str) else list(value)
        names: list[str] = []
        for item in (str(v).strip() for v in items):
            if item == ALL_TORCHVISION:
                import torchvision

                names += [f"tv:{n}" for n in torchvision.models.list_models(module=torchvision.models)]
            elif item:
                names.append(item)
        return list(dict.fromkeys(names))

    def strategies(self) -> list[str]:
        value = self.compare.get("strategies", [])
        items = value.split(",") if isinstance(value, str) else list(value)
        return [str(v).strip() for v in items if str(v).strip()]


# ------------------------------------------------------------------------------------------ loading


def _recipe_files() -> dict[str, Any]:
    folder = resources.files(__name__)
    return {p.name[: -len(".yaml")]: p for p in folder.iterdir() if p.name.endswith(".yaml")}


def list_recipes() -> list[Recipe]:
    """Every shipped recipe, by name."""
    return [load_recipe(name) for name in sorted(_recipe_files())]


def load_recipe(name: str) -> Recipe:
    """The recipe called ``name`` (a shipped one) or a path to a recipe YAML file."""
    files = _recipe_files()
    path = Path(name)
    if name in files:
        text, recipe_name = files[name].read_text(encoding="utf-8"), name
    elif path.suffix in (".yaml", ".yml") and path.is_file():
        text, recipe_name = path.read_text(encoding="utf-8"), path.stem
    else:
        import difflib

        close = difflib.get_close_matches(name, list(files), n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise RecipeError(f"Unknown recipe {name!r}.{hint} Known: {', '.join(sorted(files))} "
                          "(`transferlab recipe list`), or give a path to a recipe .yaml file.")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"Recipe {recipe_name!r} is not valid YAML: {exc}") from exc
    return _from_dict(recipe_name, data)


def _from_dict(name: str, data: Mapping[str, Any]) -> Recipe:
    known = {f.name for f in dataclasses.fields(Recipe)} - {"name", "overrides"}
    unknown = set(data) - known
    if unknown:
        raise RecipeError(f"Recipe {name!r} has unknown keys: {', '.join(sorted(unknown))}")
    recipe = Recipe(name=name, title=str(data.get("title", name)), kind=str(data.get("kind", "train")),
                    dataset=dict(data.get("dataset") or {}), config=dict(data.get("config") or {}),
                    compare=dict(data.get("compare") or {}), source=dict(data.get("source") or {}),
                    published=[dict(p) for p in data.get("published") or []])
    _check(recipe)
    return recipe


def _check(recipe: Recipe) -> None:
    from transferlab.config import TrainConfig
    from transferlab.data.public import DATASETS

    def bad(msg: str) -> None:
        raise RecipeError(f"Recipe {recipe.name!r}: {msg}")

    if recipe.kind not in KINDS:
        bad(f"kind must be one of {', '.join(KINDS)}, not {recipe.kind!r}")
    if recipe.dataset.get("name") not in DATASETS:
        bad(f"dataset.name must be one of {', '.join(DATASETS)}, not {recipe.dataset.get('name')!r}")
    if not isinstance(recipe.dataset.get("splits"), Mapping):
        bad("dataset.splits must map train/val (and optionally test) to lists of the dataset's splits")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(recipe.config) - fields
    if unknown:
        bad(f"config has unknown TrainConfig keys: {', '.join(sorted(unknown))}")
    if recipe.kind == "compare" and (not recipe.compare.get("backbones") or not recipe.compare.get("strategies")):
        bad("a compare recipe needs compare.backbones and compare.strategies")
    for fig in recipe.published:
        if fig.get("metric") not in METRICS:
            bad(f"published metric {fig.get('metric')!r} is not one of {', '.join(METRICS)}")
        if fig.get("value") is None and fig.get("low") is None and fig.get("high") is None:
            bad(f"published figure {fig} has no value, low or high")


# ----------------------------------------------------------------------------------------- overrides


def _parse_value(text: str) -> Any:
    """YAML scalars/lists; numbers PyYAML leaves as strings ('1e-4') become floats."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value) if any(c in value.lower() for c in ".e") or value.isdigit() else value
        except ValueError:
            return value
    return value


def _set_path(target: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        node = target.get(key)
        if not isinstance(node, dict):
            node = {}
            target[key] = node
        target = node
    target[path[-1]] = value


def resolve_recipe(recipe: Recipe | str, overrides: Iterable[str] = ()) -> Recipe:
    """A copy of ``recipe`` with ``key=value`` overrides applied and checked. Keys: any TrainConfig field
    (``epochs_finetune=1``, ``preprocess.mean=[0.5,0.5,0.5]``), ``backbones``/``strategies`` (compare
    recipes; comma-separated), or ``dataset.splits.train=[train]``."""
    from transferlab.config import TrainConfig

    base = load_recipe(recipe) if isinstance(recipe, str) else recipe
    resolved = copy.deepcopy(base)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RecipeError(f"Override {item!r} is not key=value (e.g. epochs_finetune=1).")
        value = _parse_value(raw.strip())
        path = key.split(".")
        if path[0] in fields:
            if path[0] in ("data", "out"):
                raise RecipeError(f"Override {key!r}: a recipe's data comes from --data-root, its output from --out.")
            _set_path(resolved.config, path, value)
        elif path[0] in ("backbones", "strategies") and len(path) == 1:
            if resolved.kind != "compare":
                raise RecipeError(f"Override {key!r} applies to compare recipes; use backbone=NAME for {base.name}.")
            resolved.compare[key] = value
        elif path[0] == "dataset" and len(path) > 1:
            _set_path(resolved.dataset, path[1:], value)
        else:
            raise RecipeError(f"Override {key!r} is not a TrainConfig field"
                              f"{', backbones, strategies' if resolved.kind == 'compare' else ''} or dataset.*.")
        resolved.overrides.append(f"{key}={raw.strip()}")
    _check(resolved)
    for strategy in resolved.strategies() if resolved.kind == "compare" else [resolved.config.get("strategy")]:
        options = {**resolved.config, **({"strategy": strategy} if strategy else {})}
        try:
            TrainConfig(data="recipe", **options).validate()
        except TypeError as exc:
            raise RecipeError(f"Recipe {resolved.name!r}: {exc}") from exc
    return resolved


# ------------------------------------------------------------------------------------ source figures


def _best(run_dir: Path) -> float | None:
    return RunDir(run_dir).summary().get("val_accuracy_best")


METRICS = {
    "feature_extraction": lambda run: best_val_accuracy(RunDir(run).metrics(), "frozen"),
    "finetune": lambda run: best_val_accuracy(RunDir(run).metrics(), "finetune"),
    "best": _best,
}
"""Published-figure metric -> the same number measured on a run directory (None when it has none)."""


def measured(run_dir: str | Path, metric: str) -> float | None:
    """The run's own value of a published figure's metric (best val accuracy of that phase)."""
    return METRICS[metric](Path(run_dir))


def figure_text(fig: Mapping[str, Any]) -> str:
    """'91.0–94.0 %', '> 96.0 %', '94.1 %'."""
    if fig.get("value") is not None:
        return f"{100 * fig['value']:.1f} %"
    low, high = fig.get("low"), fig.get("high")
    if low is not None and high is not None:
        return f"{100 * low:.1f}–{100 * high:.1f} %"
    return f"> {100 * low:.1f} %" if low is not None else f"< {100 * high:.1f} %"


def figures_for(recipe: Recipe | Mapping[str, Any], backbone: str | None = None,
                strategy: str | None = None) -> list[dict[str, Any]]:
    """The published figures that apply to one run (compare cells: its backbone × strategy)."""
    figures = recipe.published if isinstance(recipe, Recipe) else recipe.get("published", [])
    return [f for f in figures if (f.get("backbone") in (None, backbone) or backbone is None)
            and (f.get("strategy") in (None, strategy) or strategy is None)]


def versus_published(run_dir: str | Path, figures: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per figure: label, published text, this run's value, and whether it is within the figure."""
    rows = []
    for fig in figures:
        value = measured(run_dir, fig["metric"])
        low = fig.get("low", fig.get("value"))
        high = fig.get("high", fig.get("value"))
        within = None
        if value is not None and fig.get("value") is None:
            within = (low is None or value >= low) and (high is None or value <= high)
        label = fig.get("label") or " × ".join(str(fig[k]) for k in ("backbone", "strategy") if fig.get(k))
        point = fig.get("value")
        delta = value - point if value is not None and point is not None else None
        rows.append({"label": label or fig["metric"], "metric": fig["metric"], "published": figure_text(fig),
                     "this_run": value, "within": within, "delta": delta, "note": fig.get("note", "")})
    return rows
