"""Choose a backbone with evidence: per candidate, a linear probe on its frozen features, its latency
and memory on this machine; then the Pareto front and one recommendation.

Cost is one forward pass per image per backbone. The features go through the same disk cache as
training (same backbone fingerprint, same transform tag, same seed for random init), so a repeated
``select`` is nearly free and ``transferlab train`` with the chosen backbone starts from them. The C
sweep, the cross-validation and the learning curve only refit the probe on cached tensors.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from transferlab.config import TrainConfig

__all__ = ["SELECTION_COLUMNS", "SelectionResult", "candidate_names", "pareto_front", "rank_candidates", "select"]

log = logging.getLogger("transferlab")
_TRAIN = TrainConfig()  # the data and model settings a selection shares with `train`, defaults included

MAX_CANDIDATES = 12  # beyond this a filter-driven selection asks for a narrower query
SELECTION_COLUMNS = [
    "rank", "backbone", "recommended", "pareto", "within_budget", "probe_accuracy", "cv_accuracy", "probe_c",
    "cv_folds", "latency_ms_b1", "latency_ms_b32", "images_per_second", "peak_mem_mb", "weights_mb", "params",
    "gflops", "feature_dim", "input_size", "source", "pretrained", "extract_seconds", "features_cached",
    "probe_seconds", "benchmark_seconds",
]
ACCURACY, LATENCY = "probe_accuracy", "latency_ms_b1"


# ---------------------------------------------------------------------------------- pure ranking


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (cost, value) points no other point beats: none is at most as costly and at
    least as good while strictly better in one. Identical points are all kept. Sorted by cost."""
    front = []
    for i, (cost, value) in enumerate(points):
        dominated = any(c <= cost and v >= value and (c < cost or v > value) for c, v in points)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1], i))


def rank_candidates(rows: Sequence[Mapping[str, Any]], budget_ms: float | None = None
                    ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """(rows best first, recommended row or None). Best: highest ``probe_accuracy``, ties to the lower
    batch-1 ``latency_ms_b1``. The recommendation is the best row within ``budget_ms`` (any, without a
    budget); None when nothing fits. Rows are copied, with ``rank``, ``within_budget``, ``recommended``."""
    ordered = sorted((dict(r) for r in rows), key=lambda r: (-r[ACCURACY], r[LATENCY], str(r.get("backbone", ""))))
    recommended = None
    for rank, row in enumerate(ordered, 1):
        row["rank"] = rank
        row["within_budget"] = budget_ms is None or row[LATENCY] <= budget_ms
        row["recommended"] = recommended is None and row["within_budget"]
        if row["recommended"]:
            recommended = row
    return ordered, recommended


def _reason(ordered: Sequence[Mapping[str, Any]], recommended: Mapping[str, Any] | None,
            budget_ms: float | None) -> str:
    if recommended is None:
        fastest = min(ordered, key=lambda r: r[LATENCY])
        return (f"no backbone runs within {budget_ms:g} ms at batch 1 here; the fastest is {fastest['backbone']} "
                f"at {fastest[LATENCY]:.1f} ms — raise --budget-ms or add smaller candidates")
    fitting = sum(r["within_budget"] for r in ordered)
    where = f"of the {fitting} within {budget_ms:g} ms (batch 1)" if budget_ms is not None else f"of {len(ordered)}"
    return (f"{recommended['backbone']}: best linear-probe val accuracy {recommended[ACCURACY]:.4f} {where}, "
            f"{recommended[LATENCY]:.1f} ms at batch 1")


# ------------------------------------------------------------------------------------- candidates


def candidate_names(backbones: str | Sequence[str] | None = None, *, max_params: float | str | None = None,
                    search: str | None = None, pretrained: bool = True) -> list[str]:
    """Backbones to compare: the named ones, or those of the catalog matching ``search`` /
    ``max_params`` whose weights can be had now (offline: the shipped and cached ones)."""
    if isinstance(backbones, str):
        backbones = backbones.split(",")
    names = list(dict.fromkeys(n.strip() for n in backbones or () if n.strip()))
    if names:
        return names
    from transferlab.errors import TransferlabError

    if max_params is None and search is None:
        raise TransferlabError("Say which backbones to compare: --backbones a,b,c, or filter the catalog with "
                               "--max-params 30M and/or --search NAME.")
    from transferlab.models.catalog import list_catalog
    from transferlab.models.registry import is_online

    rows = list_catalog(search, max_params=max_params, offline_only=pretrained and not is_online())
    if not rows:
        raise TransferlabError("No backbone matches those filters (and is usable now); see `transferlab models`.")
    if len(rows) > MAX_CANDIDATES:
        shown = ", ".join(r["name"] for r in rows[:8])
        raise TransferlabError(f"{len(rows)} backbones match ({shown}, …); narrow with --search or name at most "
                               f"{MAX_CANDIDATES} with --backbones.")
    return [r["name"] for r in rows]


# ------------------------------------------------------------------------------------------ select


@dataclass
class SelectionResult:
    """Ranked candidates (best first), the recommendation, where the files went, and what it cost."""

    out_dir: Path
    rows: list[dict[str, Any]]
    recommended: dict[str, Any] | None
    reason: str
    budget_ms: float | None
    learning_curves: dict[str, list[dict[str, Any]]]
    seconds: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)


def _evaluate_candidate(spec, splits, *, seed: int, device: str, autocast, cache_dir: Path | None,
                        batch_size: int, num_workers: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One backbone: features (cache or one pass), probe, learning curve, latency/memory."""
    import numpy as np
    import torch

    from transferlab import _runtime
    from transferlab.data.transforms import eval_transform
    from transferlab.evaluation.benchmark import inference_cost
    from transferlab.evaluation.probe import learning_curve, linear_probe
    from transferlab.models.catalog import measure_backbone
    from transferlab.models.heads import HeadConfig, build_classifier
    from transferlab.training import feature_cache

    torch.manual_seed(seed)  # what training seeds before building: random-init backbones match its cache
    model = build_classifier(spec, len(splits.classes), HeadConfig()).to(device)
    # at the size training evaluates at (the backbone's test size, when it has one): the same
    # accuracy, latency and cached features as `train` will have
    pre = spec.eval_preprocessing
    tag = feature_cache.transform_tag(pre, autocast)  # the same key as training: shared cached features
    fingerprint = feature_cache.backbone_fingerprint(model) if cache_dir is not None else None
    t0 = time.perf_counter()
    hits, feats = [], []
    for samples in (splits.train, splits.val):
        x, hit = feature_cache.cached_features(model, samples, eval_transform(pre), tag, cache_dir=cache_dir,
                                               fingerprint=fingerprint, batch_size=batch_size, device=device,
                                               autocast_dtype=autocast, num_workers=num_workers,
                                               decode_threads=_runtime.decode_threads())
        feats.append(x.numpy())
        hits.append(hit)
    extract_seconds = time.perf_counter() - t0
    train_y = np.array([s.label for s in splits.train])
    val_y = np.array([s.label for s in splits.val])

    t1 = time.perf_counter()
    probe = linear_probe(feats[0], train_y, feats[1], val_y, seed=seed)
    curve = learning_curve(feats[0], train_y, feats[1], val_y, c=probe.c, seed=seed)
    probe_seconds = time.perf_counter() - t1

    t2 = time.perf_counter()
    cost = inference_cost(model, pre.input_size, batch_sizes=(1, 32), device=device, autocast_dtype=autocast)
    benchmark_seconds = time.perf_counter() - t2
    size = measure_backbone(dataclasses.replace(spec, preprocessing=pre))  # GFLOPs at the size it runs at
    del model  # reference counting frees it; a full gc.collect() here cost 0.2 s per candidate
    row = {
        "backbone": spec.name, "source": spec.source, "pretrained": spec.pretrained, "input_size": pre.input_size,
        "probe_accuracy": round(probe.val_accuracy, 6),
        "cv_accuracy": None if probe.cv_accuracy is None else round(probe.cv_accuracy, 6),
        "probe_c": probe.c, "cv_folds": probe.folds, **cost,
        "params": size["params"], "gflops": size["gflops"], "feature_dim": size["feature_dim"],
        "extract_seconds": round(extract_seconds, 3), "features_cached": all(hits),
        "probe_seconds": round(probe_seconds, 3), "benchmark_seconds": round(benchmark_seconds, 3),
    }
    return row, curve


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    from transferlab.io import atomic_write_text

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def select(
    data: str | Path,
    backbones: str | Sequence[str] | None = None,
    *,
    max_params: float | str | None = None,
    search: str | None = None,
    budget_ms: float | None = None,
    out: str | Path | None = None,
    pretrained: bool = _TRAIN.pretrained,
    img_size: int | None = _TRAIN.img_size,
    val_split: float = _TRAIN.val_split,
    seed: int = _TRAIN.seed,
    device: str = _TRAIN.device,
    precision: str = _TRAIN.precision,
    batch_size: int = 64,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> SelectionResult:
    """Probe, time and rank candidate backbones on `data`; write selection.csv/.json/.png and
    learning_curve.png into `out` (default runs/select-<time>)."""
    # Library imports (torch, timm, scikit-learn, matplotlib) are a once-per-process start-up cost,
    # not work per backbone: timed apart, as `train`'s internal seconds are.
    imports_start = time.perf_counter()
    import sklearn.linear_model  # noqa: F401 - the probes' import, paid here rather than inside a candidate
    import torch

    from transferlab import _runtime
    from transferlab.data.multilabel import refuse_multilabel
    from transferlab.data.sources import load_splits
    from transferlab.io import atomic_write_json, ensure_writable_dir
    from transferlab.models.registry import resolve_backbone
    from transferlab.reporting.selection_plots import plot_learning_curves, plot_selection
    from transferlab.training import feature_cache

    start = time.perf_counter()
    import_seconds = start - imports_start

    refuse_multilabel(data, "select")
    _runtime.setup_torch()
    names = candidate_names(backbones, max_params=max_params, search=search, pretrained=pretrained)
    specs = [resolve_backbone(n, pretrained=pretrained, img_size=img_size) for n in names]  # fail before data work
    out_dir = ensure_writable_dir(Path(out) if out else Path("runs") / f"select-{datetime.now():%Y%m%d-%H%M%S}")
    accelerator = _runtime.resolve_accelerator(device)
    extract_precision = _runtime.resolve_precision(precision, accelerator, training=False)
    autocast = _runtime.autocast_dtype(extract_precision)
    splits = load_splits(data, val_split=val_split, seed=seed, progress=progress)
    for w in splits.warnings:
        log.warning(w)
    log.info("data: %d train / %d val images, %d classes; %d candidate(s) on %s (%s)", len(splits.train),
             len(splits.val), len(splits.classes), len(specs), accelerator, extract_precision)
    store = feature_cache.usable_cache_dir(cache_dir)
    rows, curves = [], {}
    for spec in specs:
        row, curve = _evaluate_candidate(spec, splits, seed=seed, device=accelerator, autocast=autocast,
                                         cache_dir=store, batch_size=batch_size, num_workers=_runtime.default_num_workers())
        log.info("%s: probe val accuracy %.4f, %.1f ms at batch 1, features %s in %.1fs", spec.name,
                 row["probe_accuracy"], row["latency_ms_b1"], "from cache" if row["features_cached"] else "extracted",
                 row["extract_seconds"])
        rows.append(row)
        curves[spec.name] = curve

    front = pareto_front([(r[LATENCY], r[ACCURACY]) for r in rows])
    on_front = {rows[i]["backbone"] for i in front}
    for r in rows:
        r["pareto"] = r["backbone"] in on_front
    ordered, recommended = rank_candidates(rows, budget_ms)
    reason = _reason(ordered, recommended, budget_ms)
    files = {
        "csv": out_dir / "selection.csv",
        "json": out_dir / "selection.json",
        "plot": plot_selection(ordered, out_dir / "selection.png",
                               front=[i for i, r in enumerate(ordered) if r["pareto"]],
                               recommended=recommended and recommended["backbone"], budget_ms=budget_ms),
        "learning_curve": plot_learning_curves(curves, out_dir / "learning_curve.png"),
    }
    _write_csv(files["csv"], ordered, SELECTION_COLUMNS)
    total = time.perf_counter() - start
    extraction = sum(r["extract_seconds"] for r in rows)
    probes, benchmark = sum(r["probe_seconds"] for r in rows), sum(r["benchmark_seconds"] for r in rows)
    seconds = {
        "total": round(total, 3),
        "feature_extraction": round(extraction, 3),
        "probes": round(probes, 3),
        "benchmark": round(benchmark, 3),
        "other": round(total - extraction - probes - benchmark, 3),  # image checks, model builds, plots
        "imports": round(import_seconds, 3),
        # a ratio over cache hits would measure nothing: reported only when features were computed
        "ratio": None if all(r["features_cached"] for r in rows) else round(total / max(extraction, 1e-9), 3),
    }
    atomic_write_json(files["json"], {
        "data": str(data), "classes": splits.classes, "num_train": len(splits.train), "num_val": len(splits.val),
        "budget_ms": budget_ms, "recommended": recommended and recommended["backbone"], "reason": reason,
        "pareto_front": [rows[i]["backbone"] for i in front], "rows": ordered, "learning_curves": curves,
        "seconds": seconds, "device": accelerator, "precision": extract_precision, "threads": torch.get_num_threads(),
        "notes": {"latency": "median ms per forward pass after warm-up, random input at the input size",
                  "peak_mem_mb": "weights + peak added by a batch-32 forward pass",
                  "gflops": "multiply-accumulates x 1e9 (torchvision's convention), batch 1"},
    })
    return SelectionResult(out_dir=out_dir, rows=ordered, recommended=recommended, reason=reason,
                           budget_ms=budget_ms, learning_curves=curves, seconds=seconds, files=files)
