"""The backbone catalog: every listable backbone with its size, cost and ImageNet accuracy, in seconds.

Rows start from :func:`~transferlab.models.registry.list_backbones` (names, sources, offline status)
and add what the libraries publish without building anything: torchvision's weight enums carry
``num_params``, ``_ops`` (GFLOPs) and ``_metrics`` (ImageNet acc@1); timm's pretrained configs carry
the classifier name (timm's results tables are not in its package, so no timm top-1), and the shipped
offline weights their published top-1 (:attr:`~transferlab.models.offline.ShippedWeights.top1`). What is still missing (timm
sizes and costs, feature dims) is *measured* on the meta device — no memory, no weights, ~0.1 s a
model — but only when a query leaves few rows (:data:`MEASURE_LIMIT`), and the values are cached in
``$TRANSFERLAB_HOME/model_meta.json`` so each architecture is measured once per library version.

GFLOPs count one multiply-accumulate as one FLOP, the convention of torchvision's ``_ops`` and of
most papers: :class:`torch.utils.flop_counter.FlopCounterMode` counts two, so its total is halved
(checked: ``tv:resnet50`` measures 4.089, exactly its published ``_ops``). Batch 1, the row's
input size.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transferlab.errors import TransferlabError
from transferlab.models.registry import BackboneSpec, create_backbone, list_backbones, resolve_backbone
from transferlab.paths import home

__all__ = [
    "MEASURE_LIMIT",
    "format_count",
    "list_catalog",
    "measure_backbone",
    "meta_cache_path",
    "parse_count",
]

log = logging.getLogger("transferlab")

MEASURE_LIMIT = 30  # architectures measured per query at most (~0.1-0.3 s each on the meta device)
MEASURED_FIELDS = ("params", "gflops", "head", "feature_dim")
_CACHE_FORMAT = "transferlab.model_meta/1"
_SUFFIXES = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}


# ------------------------------------------------------------------------------------------ units


def parse_count(value: str | float) -> float:
    """'30M', '5e6', '1.5B', '500k', 25_000_000 -> a plain number (for --max-params)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip().replace("_", "").replace(",", "")
    match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmbg]?)", text, flags=re.IGNORECASE)
    if not match or float(match.group(1)) < 0:
        raise TransferlabError(f"Cannot read '{value}' as a count: use e.g. 30M, 5e6, 500k or 1.5B.")
    return float(match.group(1)) * _SUFFIXES[match.group(2).lower()]


def format_count(n: float | None) -> str:
    """25_557_032 -> '25.6M' (tables); None -> ''."""
    if n is None:
        return ""
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.1f}{suffix}"
    return str(int(n))


# -------------------------------------------------------------------------------------- measuring


def _gflops(model: nn.Module, input_size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    reference = next(model.parameters(), None)
    device = reference.device if reference is not None else torch.device("cpu")
    x = torch.zeros(1, 3, input_size, input_size, device=device)
    model.eval().requires_grad_(False)  # FlopCounterMode's module tracker trips on grad-requiring inputs
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 2 / 1e9  # FLOPs -> multiply-accumulates (see module docstring)


def _measure(model: nn.Module, input_size: int) -> dict[str, Any]:
    from transferlab.models.heads import find_head, replace_head

    params = sum(p.numel() for p in model.parameters())
    gflops = _gflops(model, input_size)
    head = find_head(model)
    feature_dim = replace_head(model, 1).in_features  # after the forward: replacing changes the model
    return {"params": int(params), "gflops": round(gflops, 4), "head": head, "feature_dim": int(feature_dim)}


def measure_backbone(spec: BackboneSpec) -> dict[str, Any]:
    """{params, gflops, head, feature_dim} of the backbone as published (its own classifier), batch 1.

    Built without weights on the meta device; architectures with an op the meta device cannot run
    are built and run once on the CPU instead.
    """
    spec = replace(spec, pretrained=False)
    size = spec.preprocessing.input_size
    try:
        with torch.device("meta"):
            model = create_backbone(spec)
        return _measure(model, size)
    except Exception as exc:  # noqa: BLE001 - any meta-device gap (missing kernel, .item()) -> real run
        log.debug("meta-device measurement of %s failed (%s); measuring on the CPU", spec.name, exc)
    return _measure(create_backbone(spec), size)


# ------------------------------------------------------------------------------------------ cache


def meta_cache_path() -> Path:
    """$TRANSFERLAB_HOME/model_meta.json (default ~/.cache/transferlab), beside the feature cache."""
    return home() / "model_meta.json"


def _load_cache(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # missing or corrupt: measure again, never fail a listing over a cache
    if not isinstance(data, dict) or data.get("format") != _CACHE_FORMAT or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


def _save_cache(path: Path, entries: Mapping[str, Any]) -> None:
    from transferlab.io import atomic_write_json

    merged = {**_load_cache(path), **entries}  # another process may have measured others meanwhile
    try:
        atomic_write_json(path, {"format": _CACHE_FORMAT, "entries": merged})
    except OSError as exc:
        log.warning("could not write the model metadata cache %s (%s)", path, exc)


def _library_versions() -> dict[str, str]:
    import timm
    import torchvision

    return {"timm": timm.__version__, "torchvision": torchvision.__version__, "offline": timm.__version__}


def _measure_key(row: Mapping[str, Any], versions: Mapping[str, str]) -> str:
    """What the measured values depend on: architecture, input size, classes, library version."""
    return (f"{row['source']}:{row['architecture']}@{row['input_size']}"
            f"/{row.get('num_classes') or 1000}|{versions[row['source']]}")


# ------------------------------------------------------------------------------------ library meta


def _tv_row(row: dict[str, Any]) -> None:
    from torchvision.models import get_weight

    weights = get_weight(row["pretrained_tag"])
    meta = weights.meta
    row["architecture"] = row["name"][len("tv:"):].partition(":")[0]
    row["params"] = meta.get("num_params")
    row["gflops"] = meta.get("_ops")
    row["top1"] = meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1")
    row["num_classes"] = len(meta.get("categories") or []) or None
    row["metadata"] = "torchvision"


def _timm_row(row: dict[str, Any]) -> None:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(row["name"]) if not row["name"].startswith("hf-hub:") else None
    if cfg is None:
        row["architecture"] = row["name"]
        return
    row["architecture"] = cfg.architecture
    classifier = cfg.classifier
    row["head"] = ",".join(classifier) if isinstance(classifier, (tuple, list)) else classifier
    row["num_classes"] = cfg.num_classes or None


def _offline_row(row: dict[str, Any]) -> None:
    from transferlab.models import offline

    shipped = offline.SHIPPED[row["name"]]
    row["architecture"] = shipped.architecture
    row["top1"] = shipped.top1
    row["num_classes"] = 1000


_LIBRARY_META = {"torchvision": _tv_row, "timm": _timm_row, "offline": _offline_row}
"""Per source: fill a row from published metadata only (never builds a model)."""


def _base_row(listed: Mapping[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {**listed, "architecture": None, "params": None, "gflops": None, "top1": None,
                           "head": None, "feature_dim": None, "num_classes": None, "metadata": None}
    _LIBRARY_META[row["source"]](row)
    return row


# ------------------------------------------------------------------------------------------- query


def _missing(row: Mapping[str, Any], wanted: Iterable[str]) -> bool:
    return any(row[f] is None for f in wanted)


def _fill(rows: list[dict[str, Any]], wanted: tuple[str, ...], limit: int,
          cache: dict[str, dict[str, Any]], versions: Mapping[str, str], fresh: dict[str, Any]) -> int:
    """Measure the rows missing any of `wanted` when at most `limit` architectures are concerned.
    Published values are never overwritten. Returns how many rows stay unmeasured."""
    todo = [r for r in rows if _missing(r, wanted)]
    keys = {_measure_key(r, versions) for r in todo}
    if not todo or len(keys - cache.keys()) > limit:
        return len(todo)
    left = 0
    for row in todo:
        key = _measure_key(row, versions)
        if key not in cache:
            try:
                spec = resolve_backbone(row["name"], pretrained=False)
                cache[key] = fresh[key] = measure_backbone(spec)
            except Exception as exc:  # noqa: BLE001 - one odd architecture must not sink the listing
                log.debug("could not measure %s: %s", row["name"], exc)
                cache[key] = {}
        _apply(row, cache[key])
        left += _missing(row, wanted)
    return left


def _apply(row: dict[str, Any], measured: Mapping[str, Any]) -> None:
    for field in MEASURED_FIELDS:
        if row[field] is None and measured.get(field) is not None:
            row[field] = measured[field]
            if field in ("params", "gflops"):
                row["metadata"] = row["metadata"] or "measured"


def list_catalog(
    search: str | None = None,
    *,
    offline_only: bool = False,
    max_params: float | str | None = None,
    max_gflops: float | None = None,
    measure_limit: int = MEASURE_LIMIT,
) -> list[dict[str, Any]]:
    """Rows {name, source, input_size, offline, pretrained_tag, architecture, params, gflops, top1,
    head, feature_dim, num_classes, metadata} for the backbones matching the filters.

    ``search`` is a substring, or a glob with ``*?[``. With ``max_params``/``max_gflops``, rows whose
    numbers are unknown (not published, and too many to measure) are left out, with a warning.
    ``metadata`` says where params/GFLOPs came from: "torchvision" (published) or "measured".
    ``measure_limit=0`` uses published and cached values only (never builds a model).
    """
    limits = {"params": None if max_params is None else parse_count(max_params),
              "gflops": None if max_gflops is None else float(max_gflops)}
    rows = [_base_row(r) for r in list_backbones(search, offline_only=offline_only)]
    path = meta_cache_path()
    cache = _load_cache(path)
    versions = _library_versions()
    for row in rows:
        if _missing(row, MEASURED_FIELDS) and _measure_key(row, versions) in cache:
            _apply(row, cache[_measure_key(row, versions)])
    fresh: dict[str, Any] = {}

    filtered = tuple(f for f, lim in limits.items() if lim is not None)
    if filtered:
        _fill(rows, filtered, measure_limit, cache, versions, fresh)
        unknown = [r for r in rows if _missing(r, filtered)]
        if unknown:
            log.warning("%d backbone(s) left out: %s not published, and more than %d would need measuring; "
                        "narrow the list with --search to include them (e.g. %s)", len(unknown),
                        " and ".join(filtered), measure_limit, unknown[0]["name"])
        rows = [r for r in rows if not _missing(r, filtered)
                and all(r[f] <= lim for f, lim in limits.items() if lim is not None)]
    _fill(rows, MEASURED_FIELDS, measure_limit, cache, versions, fresh)
    if fresh:
        _save_cache(path, fresh)
    return rows
