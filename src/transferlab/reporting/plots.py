"""Evaluation plots (PNG, headless): confusion matrix, reliability diagram, top losses, per-class accuracy;
and the data doctor's pictures (duplicate pairs, label-issue candidates).

Each takes plain data (lists, dicts: the JSON form of an evaluation), so a saved ``eval-*.json`` can be
re-plotted without the model. Class names are user data: matplotlib's mathtext is switched off for
every label (``parse_math=False``), so a class called ``$5`` is drawn as written instead of failing.
Plots stay legible with hundreds of classes: figure sizes grow with the class count up to a cap, and
cell values and tick labels are thinned out beyond what fits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from transferlab.data.images import ImageError, load_image

__all__ = ["doctor_plots", "eval_plots", "plot_confusion_matrix", "plot_image_pairs", "plot_label_issues",
           "plot_per_class_accuracy", "plot_reliability", "plot_risk_coverage", "plot_top_losses"]

CELL_TEXT_MAX_CLASSES = 30  # above this, numbers in cells are unreadable
MAX_TICK_LABELS = 40
BARS_EACH_END = 30  # per-class bars: above 2×this many classes, only the worst and best are drawn
CAPTION_CHARS = 22
DPI = 100


def _save(fig: plt.Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=DPI)
    plt.close(fig)
    tmp.replace(path)
    return path


def _short(text: str, n: int = CAPTION_CHARS) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def plot_confusion_matrix(confusion: Sequence[Sequence[int]], classes: Sequence[str], path: Path, title: str = "") -> Path:
    """Rows normalised to 1 (the diagonal is each class's recall), so rare classes read like common ones."""
    cm = np.asarray(confusion, dtype=np.float64)
    n = len(classes)
    support = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, support, out=np.zeros_like(cm), where=support > 0)
    side = min(18.0, max(5.0, 2.0 + 0.32 * n))
    fig, ax = plt.subplots(figsize=(side + 1.2, side), constrained_layout=True)
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="fraction of the true class")
    step = max(1, math.ceil(n / MAX_TICK_LABELS))
    ticks = list(range(0, n, step))
    font = max(5.0, min(10.0, 360.0 / max(len(ticks), 1)))
    labels = [_short(classes[i], 28) for i in ticks]
    ax.set_xticks(ticks, labels=labels, rotation=90 if n > 6 else 30, ha="center" if n > 6 else "right",
                  fontsize=font, parse_math=False)
    ax.set_yticks(ticks, labels=labels, fontsize=font, parse_math=False)
    if n <= CELL_TEXT_MAX_CLASSES:
        cell_font = max(5.0, min(10.0, 200.0 / n))
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=cell_font,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted" + (f" (every {step}th label)" if step > 1 else ""))
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix (rows normalised: recall on the diagonal)", parse_math=False)
    return _save(fig, path)


def plot_reliability(bins: Sequence[Mapping[str, Any]], ece: float, path: Path, title: str = "") -> Path:
    """Accuracy against confidence per bin; the red gap to the diagonal is what ECE averages."""
    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(6, 6.5), sharex=True, constrained_layout=True,
                                   gridspec_kw={"height_ratios": [3, 1]})
    full = [b for b in bins if b["count"]]
    centres = [(b["lower"] + b["upper"]) / 2 for b in full]
    widths = [b["upper"] - b["lower"] for b in full]
    acc = [b["accuracy"] for b in full]
    conf = [b["confidence"] for b in full]
    ax.bar(centres, acc, width=widths, color="#4c72b0", edgecolor="white", label="accuracy")
    ax.bar(centres, [abs(c - a) for a, c in zip(acc, conf)], bottom=[min(a, c) for a, c in zip(acc, conf)],
           width=widths, color="#dd4444", alpha=0.35, edgecolor="#dd4444", hatch="//", label="gap to confidence")
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title or f"reliability diagram — ECE {ece:.4f} ({len(bins)} bins)", parse_math=False)
    ax.grid(alpha=0.3)
    ax_n.bar([(b["lower"] + b["upper"]) / 2 for b in bins], [b["count"] for b in bins],
             width=[b["upper"] - b["lower"] for b in bins], color="#888888", edgecolor="white")
    ax_n.set_xlabel("confidence (probability of the predicted class)")
    ax_n.set_ylabel("images")
    return _save(fig, path)


def plot_risk_coverage(curve: Mapping[str, Any], path: Path, auto: Mapping[str, Any] | None = None) -> Path:
    """Error rate of the answered images against the fraction answered (most confident first); the
    point `predict --unknown auto` picks, when given."""
    fig, ax = plt.subplots(figsize=(6, 4.5), constrained_layout=True)
    ax.plot(curve["coverage"], curve["risk"], color="#4c72b0", linewidth=2, label=f"AURC {curve['aurc']:.4f}")
    if auto and auto.get("precision") is not None:
        ax.plot([auto["coverage"]], [1 - auto["precision"]], "o", color="#dd4444",
                label=f"--unknown auto (target precision {auto['target_precision']})")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("coverage (fraction answered, most confident first)")
    ax.set_ylabel("risk (error rate of the answered)")
    ax.set_title("risk–coverage", parse_math=False)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _thumbnail(path: str, size: int) -> np.ndarray | None:
    try:
        image = load_image(path, at_least=size)  # a picture: big JPEGs decode at a reduced scale
    except (ImageError, OSError):
        return None
    image.thumbnail((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image)


def _image_grid(paths: Sequence[str], captions: Sequence[str], path: Path, title: str, ncols: int = 4,
                thumb: int = 160) -> Path:
    """Thumbnails of `paths` in rows of `ncols`, each under its caption; a missing image says so."""
    n = max(1, len(paths))
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.9 * nrows), squeeze=False, constrained_layout=True)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image_path, caption in zip(axes.flat, paths, captions):
        pixels = _thumbnail(image_path, thumb)
        if pixels is None:
            ax.text(0.5, 0.5, "image unavailable", ha="center", va="center", color="grey", transform=ax.transAxes)
        else:
            ax.imshow(pixels)
        ax.set_title(caption, fontsize=8, parse_math=False)
    if not paths:
        axes.flat[0].text(0.5, 0.5, "no images", ha="center", va="center", transform=axes.flat[0].transAxes)
    fig.suptitle(title, fontsize=10, parse_math=False)
    return _save(fig, path)


def plot_top_losses(entries: Sequence[Mapping[str, Any]], path: Path, ncols: int = 4, thumb: int = 160) -> Path:
    """The images the model is most wrong about, captioned "true / predicted / p(predicted)"."""
    captions = [f"{_short(e['true'])} / {_short(e['predicted'])} / {e['probability']:.2f}\nloss {e['loss']:.2f}"
                for e in entries]
    return _image_grid([e["path"] for e in entries], captions, path,
                       "top losses: true / predicted / probability of predicted", ncols, thumb)


DOCTOR_PAIRS_SHOWN = 8  # duplicate pairs drawn (two per row); the tables and the CSV list all of them
DOCTOR_IMAGES_SHOWN = 12


def plot_image_pairs(findings: Sequence[Mapping[str, Any]], path: Path, thumb: int = 128) -> Path:
    """Duplicate pairs side by side (two pairs per row): each image above its split and file name, the
    listed one captioned with the pair's score."""
    paths, captions = [], []
    for f in findings:
        score = "identical" if f["kind"] == "exact_duplicate" else f"similarity {f['score']:.3f}"
        paths += [f["partner"], f["path"]]
        captions += [f"{f['partner_split']}: {_short(Path(f['partner']).name)}",
                     f"{f['split']}: {_short(Path(f['path']).name)}\n{score}"]
    return _image_grid(paths, captions, path, "duplicates: each pair side by side", 4, thumb)


def plot_label_issues(findings: Sequence[Mapping[str, Any]], path: Path, thumb: int = 128) -> Path:
    """Likely mislabelled images, captioned "label -> suggested / p(label)"."""
    captions = [f"{_short(f['label'])} -> {_short(f['suggested_label'])}\np(label) {1 - f['score']:.2f}"
                for f in findings]
    return _image_grid([f["path"] for f in findings], captions, path,
                       "label-issue candidates: given label -> suggested label", 4, thumb)


def doctor_plots(doctor: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    """The pictures of a saved doctor result (``DoctorResult.to_dict()``) into out_dir, by name: duplicate
    pairs and label-issue candidates, each when there are any."""
    findings = doctor["findings"]
    pairs = [f for f in findings if f["kind"] in ("exact_duplicate", "near_duplicate")][:DOCTOR_PAIRS_SHOWN]
    issues = [f for f in findings if f["kind"] == "label_issue"][:DOCTOR_IMAGES_SHOWN]
    plots = {}
    if pairs:
        plots["duplicates"] = plot_image_pairs(pairs, Path(out_dir) / "duplicates.png")
    if issues:
        plots["label_issues"] = plot_label_issues(issues, Path(out_dir) / "label_issues.png")
    return plots


def plot_per_class_accuracy(accuracy: Mapping[str, float | None], path: Path, title: str = "") -> Path:
    """Horizontal bars, worst class at the top; classes without images are left out (and counted)."""
    scored = sorted(((v, k) for k, v in accuracy.items() if v is not None), key=lambda t: (t[0], t[1]))
    absent = sum(v is None for v in accuracy.values())
    note = []
    if len(scored) > 2 * BARS_EACH_END:
        note.append(f"{BARS_EACH_END} lowest and {BARS_EACH_END} highest of {len(scored)} classes")
        scored = scored[:BARS_EACH_END] + scored[-BARS_EACH_END:]
    if absent:
        note.append(f"{absent} class(es) without images not shown")
    names = [_short(k, 32) for _, k in scored]
    values = [v for v, _ in scored]
    fig, ax = plt.subplots(figsize=(7.5, min(20.0, 1.2 + 0.26 * max(len(scored), 2))), constrained_layout=True)
    y = np.arange(len(scored))
    ax.barh(y, values, color=plt.get_cmap("RdYlGn")(np.asarray(values) * 0.85 + 0.075), edgecolor="white")
    ax.set_yticks(y, labels=names, fontsize=8 if len(scored) <= 40 else 6, parse_math=False)
    ax.set_ylim(len(scored) - 0.5, -0.5)  # worst first, at the top, no empty margins
    for yi, v in zip(y, values):
        ax.text(v + 0.01, yi, f"{v:.2f}", va="center", fontsize=7)
    ax.set_xlim(0, 1.1)
    ax.set_xlabel("accuracy (recall)")
    ax.set_title(title or "\n".join(["per-class accuracy", *note]), fontsize=10, parse_math=False)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def eval_plots(evaluation: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    """All the plots of a saved evaluation (``EvalResult.to_dict()``) into out_dir, by name."""
    out_dir = Path(out_dir)
    m = evaluation["metrics"]
    interp = evaluation["interpretation"]
    if m.get("task") == "multilabel":  # no confusion matrix or softmax calibration: the per-label AP
        ap = {row["label"]: row["ap"] for row in m["per_label"]}
        return {"per_label_ap": plot_per_class_accuracy(ap, out_dir / "per_label_ap.png", title="per-label AP")}
    plots = {
        "confusion_matrix": plot_confusion_matrix(m["confusion_matrix"], evaluation["classes"],
                                                  out_dir / "confusion_matrix.png"),
        "reliability": plot_reliability(m["reliability"], m["ece"], out_dir / "reliability.png"),
        "per_class_accuracy": plot_per_class_accuracy(interp["per_class_accuracy"], out_dir / "per_class_accuracy.png"),
    }
    if interp["top_losses"]:
        plots["top_losses"] = plot_top_losses(interp["top_losses"], out_dir / "top_losses.png")
    cal, sel = m.get("calibration"), m.get("selective")
    if cal and cal["temperature"] != 1.0:  # with T = 1 "before" is the diagram above
        plots["reliability_before"] = plot_reliability(
            cal["reliability_before"], cal["ece_before"], out_dir / "reliability_before.png",
            title=f"before temperature scaling — ECE {cal['ece_before']:.4f}")
    if sel:
        plots["risk_coverage"] = plot_risk_coverage(sel["risk_coverage"], out_dir / "risk_coverage.png",
                                                    sel.get("unknown_auto"))
    return plots
