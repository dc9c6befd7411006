"""Run a recipe through the ordinary machinery: dataset → CSV index → ``train`` (or ``compare``), with the
recipe and its source figures written beside the run so ``transferlab report`` can show them."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from transferlab.errors import BackboneUnavailable, TransferlabError
from transferlab.recipes import RECIPE_FILE, Recipe, figures_for, versus_published

__all__ = ["RecipeResult", "check_available", "run_recipe"]

log = logging.getLogger("transferlab")


@dataclass
class RecipeResult:
    """Where a recipe ran and how its numbers stand against the published ones."""

    recipe: Recipe
    out_dir: Path  # the run directory (train) or the compare folder
    data: Path  # the CSV index the runs read
    versus: list[dict[str, Any]] = field(default_factory=list)  # rows of versus_published (+ run_dir)
    result: Any = None  # TrainResult | CompareResult


def _data_root(data_root: str | Path | None) -> Path:
    from transferlab.data.digits import default_datasets_root

    return Path(data_root).expanduser().absolute() if data_root else default_datasets_root()


def check_available(recipe: Recipe, data_root: str | Path | None = None) -> None:
    """Fail before any work, with one message for everything missing: the dataset (offline, with the
    files to fetch and where to put them) and pretrained weights that cannot be had."""
    from transferlab.data.public import DATASETS, dataset_missing, missing_message, offline_reason
    from transferlab.models.registry import resolve_backbone

    root = _data_root(data_root)
    name = recipe.dataset["name"]
    problems: list[str] = []
    missing = dataset_missing(name, root)
    if missing:
        reason = offline_reason([url for url, *_ in DATASETS[name].urls()])
        if reason:
            problems.append(missing_message(DATASETS[name], root, missing, reason))
    pretrained = recipe.config.get("pretrained", True)
    if recipe.kind == "train":
        needs = [recipe.config.get("backbone", "efficientnet_lite0")] if pretrained else []
    else:  # scratch cells need no weights
        needs = recipe.backbones() if pretrained and set(recipe.strategies()) - {"scratch"} else []
    unavailable = []
    for backbone in needs:
        try:
            resolve_backbone(backbone, pretrained=True, img_size=recipe.config.get("img_size"))
        except BackboneUnavailable as exc:
            unavailable.append(str(exc) if len(needs) == 1 else backbone)
    if unavailable:
        problems.append(unavailable[0] if len(needs) == 1 else
                        f"Pretrained weights for {len(unavailable)} backbone(s) cannot be had now: "
                        f"{', '.join(unavailable)}. Run once with network access (the weights are cached), "
                        "or restrict the grid with --override backbones=..., or use --no-pretrained.")
    if problems:
        raise TransferlabError("\n\n".join(problems))


def _write_recipe(folder: Path, recipe: Recipe, figures: list[dict[str, Any]], **extra: Any) -> None:
    from transferlab.io import atomic_write_json, ensure_writable_dir

    ensure_writable_dir(folder)
    atomic_write_json(folder / RECIPE_FILE, {**recipe.to_dict(), "published": figures, **extra})


def run_recipe(recipe: Recipe, *, data_root: str | Path | None = None, out: str | Path | None = None,
               device: str = "auto", progress: bool = True) -> RecipeResult:
    """Prepare the dataset (download through torchvision when online and missing), then train or compare
    with the recipe's settings. ``recipe`` is already resolved (overrides applied)."""
    from transferlab.config import TrainConfig
    from transferlab.data.public import prepare_dataset
    from transferlab.training.run import train
    from transferlab.workflows.compare import compare

    check_available(recipe, data_root)
    data = prepare_dataset(recipe.dataset["name"], _data_root(data_root), recipe.dataset["splits"])
    out_dir = Path(out) if out else Path("runs") / f"{recipe.name}-{datetime.now():%Y%m%d-%H%M%S}"
    # the CSV prepare_dataset wrote lives in ROOT/transferlab/ and names the dataset's own files beside it
    options = {"device": device, "csv_anywhere": True, **recipe.config, "progress": progress,
               "extra": {**recipe.config.get("extra", {}), "recipe": recipe.name}}
    if recipe.kind == "train":
        # written first: the report at the end of training reads it
        _write_recipe(out_dir, recipe, figures_for(recipe), data=str(data))
        result = train(TrainConfig.from_options("recipe", data, {**options, "out": str(out_dir)}))
        versus = [{**row, "run_dir": str(result.run_dir)} for row in versus_published(result.run_dir, figures_for(recipe))]
        return RecipeResult(recipe, result.run_dir, data, versus, result)

    from transferlab.workflows.compare import cell_dir

    backbones, strategies = recipe.backbones(), recipe.strategies()
    _write_recipe(out_dir, recipe, recipe.published, data=str(data))
    for backbone in backbones:
        for strategy in strategies:
            _write_recipe(cell_dir(out_dir, backbone, strategy), recipe, figures_for(recipe, backbone, strategy),
                          data=str(data), cell={"backbone": backbone, "strategy": strategy})
    result = compare(data, backbones, strategies, out=out_dir, **options)
    versus = []
    for row in result.rows:
        for line in versus_published(row["run_dir"], figures_for(recipe, row["backbone"], row["strategy"])):
            versus.append({**line, "label": f"{row['backbone']} × {row['strategy']}", "run_dir": row["run_dir"]})
    return RecipeResult(recipe, out_dir, data, versus, result)


def describe(recipe: Recipe) -> str:
    """Plain-text summary for `recipe show`: dataset, resolved settings, source and its figures."""
    import yaml

    from transferlab.recipes import figure_text

    lines = [f"{recipe.name}: {recipe.title}", f"kind: {recipe.kind}",
             f"dataset: {recipe.dataset['name']} (splits: "
             + ", ".join(f"{ours} = {'+'.join(theirs)}" for ours, theirs in recipe.dataset["splits"].items()) + ")"]
    if recipe.overrides:
        lines.append("overrides: " + " ".join(recipe.overrides))
    if recipe.kind == "compare":
        backbones = recipe.backbones()
        shown = ", ".join(backbones[:8]) + (f", … ({len(backbones)} in all)" if len(backbones) > 8 else "")
        lines += [f"backbones: {shown}", f"strategies: {', '.join(recipe.strategies())}"]
    lines.append("config:")
    for key, value in recipe.config.items():  # one line per setting, as YAML would write the value
        dumped = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
        lines.append(f"  {key}: {dumped.removesuffix('...').strip()}")
    src = recipe.source
    lines.append(f"source: {src.get('title', '—')}")
    for key in ("url", "dataset", "figures"):
        if src.get(key):
            lines.append(f"  {key}: {src[key]}")
    lines += [f"  - {note}" for note in src.get("notes", [])]
    if recipe.published:
        lines.append("published figures (val accuracy):")
        for fig in recipe.published:
            label = fig.get("label") or " × ".join(str(fig[k]) for k in ("backbone", "strategy") if fig.get(k))
            note = f"  ({fig['note']})" if fig.get("note") else ""
            lines.append(f"  {label}: {figure_text(fig)}{note}")
    else:
        lines.append("published figures: none given by the source")
    return "\n".join(lines)
