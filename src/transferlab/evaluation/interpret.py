"""Where a classifier goes wrong (fastai's ClassificationInterpretation, as plain functions):
the class pairs it confuses most, the images it is most confidently wrong about, accuracy per class."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["interpret", "most_confused", "per_class_accuracy", "top_losses"]


def most_confused(confusion: Sequence[Sequence[int]], classes: Sequence[str], min_count: int = 1) -> list[dict[str, Any]]:
    """Off-diagonal cells of the confusion matrix (rows: true, columns: predicted), most frequent
    first; ties in class order so the list is stable."""
    cm = np.asarray(confusion)
    pairs = [
        {"true": classes[i], "predicted": classes[j], "count": int(cm[i, j])}
        for i in range(cm.shape[0]) for j in range(cm.shape[1])
        if i != j and cm[i, j] >= min_count
    ]
    return sorted(pairs, key=lambda p: -p["count"])  # sorted() is stable: row-major order breaks ties


def top_losses(
    probabilities: np.ndarray, targets: np.ndarray, paths: Sequence[str], classes: Sequence[str], n: int = 16
) -> list[dict[str, Any]]:
    """The n images with the highest cross-entropy (-log p(true class)), highest first."""
    probs = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(targets, dtype=np.int64)
    rows = np.arange(len(y))
    p_true = probs[rows, y]
    losses = -np.log(np.clip(p_true, np.finfo(np.float64).tiny, None))
    pred = probs.argmax(axis=1)
    order = np.argsort(-losses, kind="stable")[: max(0, n)]
    return [
        {
            "path": str(paths[i]),
            "true": classes[y[i]],
            "predicted": classes[pred[i]],
            "probability": float(probs[i, pred[i]]),  # of the predicted class
            "probability_true": float(p_true[i]),
            "loss": float(losses[i]),
        }
        for i in order
    ]


def per_class_accuracy(confusion: Sequence[Sequence[int]], classes: Sequence[str]) -> dict[str, float | None]:
    """Fraction of each class's images predicted correctly (its recall); None when it has no images."""
    cm = np.asarray(confusion)
    support = cm.sum(axis=1)
    return {name: (float(cm[i, i] / support[i]) if support[i] else None) for i, name in enumerate(classes)}


def interpret(
    probabilities: np.ndarray,
    targets: np.ndarray,
    paths: Sequence[str],
    classes: Sequence[str],
    confusion: Sequence[Sequence[int]],
    n_top_losses: int = 16,
) -> dict[str, Any]:
    """All three, JSON-ready: what the report and the CLI show."""
    return {
        "most_confused": most_confused(confusion, classes),
        "top_losses": top_losses(probabilities, targets, paths, classes, n_top_losses),
        "per_class_accuracy": per_class_accuracy(confusion, classes),
    }
