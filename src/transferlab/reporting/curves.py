"""Training curves: loss and accuracy per epoch, train and val, with the phase switch marked."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

PHASE_LABELS = {"frozen": "feature extraction", "finetune": "fine-tuning"}


def plot_curves(rows: Sequence[dict], path: Path, title: str = "") -> Path:
    """rows: metrics records with phase, train/val loss and accuracy. Epochs are numbered across
    phases so the switch from feature extraction to fine-tuning shows as one vertical line."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    x = list(range(1, len(rows) + 1))
    for key, style, label in (("train", "-", "train"), ("val", "--", "val")):
        ax_loss.plot(x, [r.get(f"{key}_loss", float("nan")) for r in rows], style, marker=".", label=label)
        ax_acc.plot(x, [r.get(f"{key}_accuracy", float("nan")) for r in rows], style, marker=".", label=label)
    switches = [i + 0.5 for i in range(1, len(rows)) if rows[i]["phase"] != rows[i - 1]["phase"]]
    for ax in (ax_loss, ax_acc):
        for s in switches:
            ax.axvline(s, color="grey", linestyle=":", linewidth=1.5)
            ax.annotate(f"→ {PHASE_LABELS.get(rows[int(s + 0.5) - 1]['phase'], '')}", (s, 1.0),
                        xycoords=("data", "axes fraction"), xytext=(3, -12), textcoords="offset points",
                        fontsize=8, color="grey")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    ax_loss.set_ylabel("cross-entropy loss")
    ax_acc.set_ylabel("accuracy")
    ax_loss.set_title("loss")
    ax_acc.set_title("accuracy")
    if title:
        fig.suptitle(title)
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
