"""Plots for choosing a backbone: accuracy against latency with the Pareto front, and learning curves.

Plain data in (the rows of ``selection.json``), PNG out, so a saved selection can be re-plotted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display
import matplotlib.pyplot as plt

from transferlab.reporting.plots import _save

__all__ = ["plot_learning_curves", "plot_selection"]


def plot_selection(rows: Sequence[Mapping[str, Any]], path: Path, *, front: Sequence[int] = (),
                   recommended: str | None = None, budget_ms: float | None = None,
                   x_key: str = "latency_ms_b1", y_key: str = "probe_accuracy") -> Path:
    """Scatter of probe accuracy against batch-1 latency; the Pareto front is joined by a step line
    (nothing above-left of it exists), the budget is a vertical line, the recommendation a star."""
    fig, ax = plt.subplots(figsize=(7.5, 5), constrained_layout=True)
    xs = [float(r[x_key]) for r in rows]
    ys = [float(r[y_key]) for r in rows]
    on_front = set(front)
    ax.scatter([x for i, x in enumerate(xs) if i not in on_front], [y for i, y in enumerate(ys) if i not in on_front],
               s=40, color="#9aa5b1", label="dominated", zorder=3)
    ordered = sorted(on_front, key=lambda i: xs[i])
    if ordered:
        ax.step([xs[i] for i in ordered], [ys[i] for i in ordered], where="post", color="#3a6ea5", linewidth=1.5,
                zorder=2)
        ax.scatter([xs[i] for i in ordered], [ys[i] for i in ordered], s=55, color="#3a6ea5",
                   label="Pareto front", zorder=4)
    for r, x, y in zip(rows, xs, ys):
        ax.annotate(str(r["backbone"]), (x, y), xytext=(5, 4), textcoords="offset points", fontsize=8,
                    parse_math=False)
        if r["backbone"] == recommended:
            ax.scatter([x], [y], s=260, marker="*", color="#e0a000", edgecolor="black", zorder=5,
                       label=f"recommended: {recommended}")
    if budget_ms is not None:
        ax.axvline(budget_ms, color="#c0392b", linestyle="--", linewidth=1.2, label=f"budget {budget_ms:g} ms")
    if xs and max(xs) > 20 * max(min(xs), 1e-9):
        ax.set_xscale("log")
    ax.set_xlabel("latency, batch 1 (ms, median)")
    ax.set_ylabel("linear-probe val accuracy")
    ax.set_title("accuracy vs latency")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def plot_learning_curves(curves: Mapping[str, Sequence[Mapping[str, Any]]], path: Path) -> Path:
    """Probe val accuracy against images per class, one line per backbone (log x; "all" labelled)."""
    fig, ax = plt.subplots(figsize=(7.5, 5), constrained_layout=True)
    ticks: dict[int, str] = {}
    for name, points in curves.items():
        xs = [p["per_class"] for p in points]
        ys = [p["accuracy"] for p in points]
        ax.errorbar(xs, ys, yerr=[p.get("std", 0.0) for p in points], marker="o", capsize=3, label=name)
        for p in points:
            ticks[p["per_class"]] = f"all\n({p['per_class']})" if p.get("all") else str(p["per_class"])
    ax.set_xscale("log")
    ax.set_xticks(sorted(ticks), labels=[ticks[t] for t in sorted(ticks)])
    ax.minorticks_off()
    ax.set_xlabel("train images per class")
    ax.set_ylabel("linear-probe val accuracy")
    ax.set_title("learning curve (from cached features)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
