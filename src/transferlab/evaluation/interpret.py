"""Where a classifier goes wrong (fastai's ClassificationInterpretation, as plain functions):
the class pairs it confuses most, the images it is most confidently wrong about, accuracy per class."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["correct_sample", "interpret", "most_confused", "per_class_accuracy", "top_losses"]


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


def _scored(probabilities: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(probabilities, targets, p(true class), cross-entropy) as float64/int64 arrays."""
    probs = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(targets, dtype=np.int64)
    p_true = probs[np.arange(len(y)), y]
    return probs, y, p_true, -np.log(np.clip(p_true, np.finfo(np.float64).tiny, None))


def _rows(order: Sequence[int], probs: np.ndarray, y: np.ndarray, p_true: np.ndarray, losses: np.ndarray,
          paths: Sequence[str], classes: Sequence[str]) -> list[dict[str, Any]]:
    pred = probs.argmax(axis=1)
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


def top_losses(
    probabilities: np.ndarray, targets: np.ndarray, paths: Sequence[str], classes: Sequence[str], n: int = 16
) -> list[dict[str, Any]]:
    """The n images with the highest cross-entropy (-log p(true class)), highest first."""
    probs, y, p_true, losses = _scored(probabilities, targets)
    order = np.argsort(-losses, kind="stable")[: max(0, n)]
    return _rows(order, probs, y, p_true, losses, paths, classes)


def correct_sample(
    probabilities: np.ndarray, targets: np.ndarray, paths: Sequence[str], classes: Sequence[str], n: int = 8
) -> list[dict[str, Any]]:
    """Up to n correctly predicted images spread evenly from the least to the most confident (the rows of
    `top_losses`): what the model gets right, typical cases and borderline ones, beside its worst errors."""
    probs, y, p_true, losses = _scored(probabilities, targets)
    right = np.flatnonzero(probs.argmax(axis=1) == y)
    if not len(right) or n < 1:
        return []
    by_confidence = right[np.argsort(p_true[right], kind="stable")]
    picks = np.unique(np.linspace(0, len(by_confidence) - 1, min(n, len(by_confidence))).round().astype(int))
    return _rows(by_confidence[picks], probs, y, p_true, losses, paths, classes)


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
    """All of them, JSON-ready: what the report and the CLI show."""
    return {
        "most_confused": most_confused(confusion, classes),
        "top_losses": top_losses(probabilities, targets, paths, classes, n_top_losses),
        "correct_sample": correct_sample(probabilities, targets, paths, classes),
        "per_class_accuracy": per_class_accuracy(confusion, classes),
    }
