"""Plots and the self-contained HTML page of a backbone × strategy comparison.

Plain data in (the rows and metrics of ``compare.json``), files out. The page follows the run
report's rules (reporting/html.py, whose table/escaping/embedding helpers it reuses): images inline as
base64, no script, no URL, every user string escaped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from transferlab.io import atomic_write_text
from transferlab.reporting.curves import PHASE_LABELS
from transferlab.reporting.html import CSS, _esc, _fmt, _Html, _img, _table
from transferlab.reporting.plots import _save

__all__ = ["plot_compare_accuracy", "plot_compare_curves", "write_compare_html"]

# bars per backbone group: (row key, label suffix, hatch)
_STAGES = (("val_accuracy_feature_extraction", "after feature extraction", ""),
           ("val_accuracy_finetune", "after fine-tuning", "//"))


def plot_compare_accuracy(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Grouped bars, one group per backbone: best val accuracy of each strategy after feature extraction
    (plain) and after fine-tuning (hatched); a strategy without that stage has no bar."""
    backbones = list(dict.fromkeys(r["backbone"] for r in rows))
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    bars = [(s, key, label, hatch) for s in strategies for key, label, hatch in _STAGES
            if any(r["strategy"] == s and r.get(key) is not None for r in rows)]
    colours = {s: plt.get_cmap("tab10")(i) for i, s in enumerate(strategies)}
    width = 0.8 / max(len(bars), 1)
    fig, ax = plt.subplots(figsize=(max(6.5, 1.2 + 1.6 * len(backbones) * max(len(bars), 1) / 3), 4.8),
                           constrained_layout=True)
    by_cell = {(r["backbone"], r["strategy"]): r for r in rows}
    for j, (strategy, key, label, hatch) in enumerate(bars):
        xs, ys = [], []
        for i, backbone in enumerate(backbones):
            value = by_cell.get((backbone, strategy), {}).get(key)
            if value is not None:
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(value)
        ax.bar(xs, ys, width=width * 0.92, color=colours[strategy], hatch=hatch, edgecolor="white",
               label=f"{strategy}: {label}")
        for x, y in zip(xs, ys):
            ax.text(x, y + 0.01, f"{y:.3f}", ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_xticks(range(len(backbones)), labels=backbones, parse_math=False)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("best val accuracy")
    ax.set_title("accuracy after each stage, per backbone and strategy")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncols=2, frameon=False)
    return _save(fig, path)


def plot_compare_curves(curves: Mapping[str, Sequence[Mapping[str, Any]]], path: Path) -> Path:
    """Val accuracy per epoch of every run on one figure, epochs numbered across phases; where a run
    switches from feature extraction to fine-tuning, a dotted line in its colour."""
    fig, ax = plt.subplots(figsize=(9, 5), constrained_layout=True)
    for i, (name, rows) in enumerate(curves.items()):
        colour = plt.get_cmap("tab10")(i % 10)
        x = np.arange(1, len(rows) + 1)
        ax.plot(x, [float(r["val_accuracy"]) for r in rows], marker=".", color=colour, label=name)
        for k in range(1, len(rows)):
            if rows[k]["phase"] != rows[k - 1]["phase"]:
                ax.axvline(k + 0.5, color=colour, linestyle=":", linewidth=1.3)
                ax.annotate(f"→ {PHASE_LABELS.get(rows[k]['phase'], rows[k]['phase'])}", (k + 0.5, 0.02),
                            xycoords=("data", "axes fraction"), xytext=(3, 0), textcoords="offset points",
                            fontsize=7, color=colour, rotation=90, va="bottom")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch (feature-extraction epochs, then fine-tuning epochs)")
    ax.set_ylabel("val accuracy")
    ax.set_title("val accuracy per epoch, all runs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


_HEADERS = [("backbone", "backbone"), ("strategy", "strategy"), ("val_accuracy_feature_extraction", "acc. after FE"),
            ("val_accuracy_finetune", "acc. after FT"), ("val_accuracy_best", "best val acc."),
            ("train_seconds", "train s"), ("latency_ms_b1", "latency b1 (ms)"),
            ("peak_train_mem_mb", "peak train MiB"), ("peak_infer_mem_mb", "peak infer MiB"), ("params", "params"),
            ("status", "this time")]


def write_compare_html(rows: Sequence[Mapping[str, Any]], files: Mapping[str, Path], path: Path, *, data: str) -> Path:
    """compare.html: the table (best cell highlighted), both plots inline, and where each run lives."""
    from transferlab._version import __version__

    best = max(range(len(rows)), key=lambda i: rows[i]["val_accuracy_best"])
    table_rows = [[_fmt(r.get(k), 1) if k in ("train_seconds", "peak_train_mem_mb", "peak_infer_mem_mb")
                   else (f"{r[k]:,}" if k == "params" else r.get(k)) for k, _ in _HEADERS] for r in rows]
    runs = _table(["run", "folder"], [[f"{r['backbone']} × {r['strategy']}",
                                       _Html(f"<span class=path>{_esc(r['run_dir'])}</span>")] for r in rows])
    body = [
        "<h1>transferlab comparison</h1>",
        (f"<p class=muted>generated {datetime.now():%Y-%m-%d %H:%M} by transferlab {_esc(__version__)} — data "
         f"<span class=path>{_esc(data)}</span></p>"),
        "<h2>Results</h2>",
        _table([h for _, h in _HEADERS], table_rows, row_class=["best" if i == best else "" for i in range(len(rows))]),
        ("<p class=muted>FE: feature extraction (head on frozen features); FT: fine-tuning. Latency: median of a "
         "batch-1 forward pass of the trained model on this machine. Peak train memory: increase of the process's "
         "peak memory while the cell trained (blank when it was not recorded).</p>"),
        "<div class=grid>",
        f"<div><h3>Accuracy per stage</h3>{_img(files['accuracy_plot'], 'accuracy per stage')}</div>",
        f"<div><h3>Accuracy per epoch</h3>{_img(files['curves_plot'], 'accuracy per epoch')}</div>",
        "</div>",
        "<h2>Runs</h2>", runs,
    ]
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>transferlab comparison</title><style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")
    atomic_write_text(path, page)
    return Path(path)
