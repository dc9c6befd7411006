"""Multi-label metrics from sigmoid probabilities and per-label thresholds; torchmetrics does the maths.

    m = multilabel_metrics(probs, targets, classes, thresholds)
    m["map"], m["micro"]["f1"], m["macro"]["f1"], m["subset_accuracy"], m["per_label"][0]

``map`` is the macro average precision over the labels with at least one positive in the data (a
label absent from them has no AP: ``absent_labels`` names them); it does not depend on the thresholds.
Precision, recall, F1 and subset accuracy (every label of the image right: exact match) are of the
thresholded predictions, as ``predict`` returns them. ``accuracy`` is the subset accuracy, so code
reading an evaluation's headline accuracy reads the strictest multi-label one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import (
    multilabel_average_precision,
    multilabel_exact_match,
    multilabel_f1_score,
    multilabel_precision,
    multilabel_recall,
)

__all__ = ["multilabel_metrics", "predicted_sets", "worst_images"]


def predicted_sets(probabilities: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """(N, C) 0/1: each label at or above its threshold."""
    return (np.asarray(probabilities) >= np.asarray(thresholds, dtype=np.float64)[None, :]).astype(np.int64)


def multilabel_metrics(probabilities: np.ndarray, targets: np.ndarray, classes: Sequence[str],
                       thresholds: Sequence[float]) -> dict[str, Any]:
    """JSON-ready metrics for (N, C) probabilities against (N, C) 0/1 targets."""
    probs = torch.as_tensor(np.asarray(probabilities, dtype=np.float32))
    y = torch.as_tensor(np.asarray(targets)).long()
    c = len(classes)
    if probs.ndim != 2 or probs.shape != y.shape or probs.shape[1] != c:
        raise ValueError(f"probabilities {tuple(probs.shape)} and targets {tuple(y.shape)} must both be N x {c}")
    n = len(y)
    if n == 0:
        raise ValueError("no predictions to score")
    pred = torch.as_tensor(predicted_sets(probs.numpy(), thresholds))
    # binarised here with each label's threshold: torchmetrics then cuts the 0/1 predictions at 0.5
    hard = {"preds": pred.float(), "target": y, "num_labels": c, "threshold": 0.5, "zero_division": 0}
    support = y.sum(dim=0)
    present = support > 0
    ap = torch.full((c,), float("nan"))
    if bool(present.any()):
        ap[present] = multilabel_average_precision(probs[:, present], y[:, present], num_labels=int(present.sum()),
                                                   average=None).float()
    per = {name: fn(**hard, average=None) for name, fn in
           (("precision", multilabel_precision), ("recall", multilabel_recall), ("f1", multilabel_f1_score))}
    loss = F.binary_cross_entropy(probs.double().clamp(1e-7, 1 - 1e-7), y.double()).item()
    subset = float(multilabel_exact_match(pred, y, num_labels=c))
    return {
        "n": n,
        "task": "multilabel",
        "map": float(ap[present].mean()) if bool(present.any()) else float("nan"),
        "accuracy": subset,
        "subset_accuracy": subset,
        "hamming_accuracy": float((pred == y).float().mean()),
        "micro": {k: float(fn(**hard, average="micro")) for k, fn in
                  (("precision", multilabel_precision), ("recall", multilabel_recall), ("f1", multilabel_f1_score))},
        "macro": {k: float(fn(**hard, average="macro")) for k, fn in
                  (("precision", multilabel_precision), ("recall", multilabel_recall), ("f1", multilabel_f1_score))},
        "log_loss": loss,  # binary cross-entropy averaged over images and labels
        "label_cardinality": float(y.sum(dim=1).float().mean()),
        "predicted_cardinality": float(pred.sum(dim=1).float().mean()),
        "absent_labels": [name for name, p in zip(classes, present.tolist()) if not p],
        "per_label": [
            {"label": name, "precision": float(per["precision"][i]), "recall": float(per["recall"][i]),
             "f1": float(per["f1"][i]), "ap": None if not present[i] else float(ap[i]),
             "support": int(support[i]), "threshold": float(thresholds[i])}
            for i, name in enumerate(classes)
        ],
    }


def worst_images(probabilities: np.ndarray, targets: np.ndarray, paths: Sequence[str], classes: Sequence[str],
                 thresholds: Sequence[float], count: int) -> list[dict[str, Any]]:
    """The `count` images with the highest binary cross-entropy: their true and predicted label sets."""
    probs = np.clip(np.asarray(probabilities, np.float64), 1e-7, 1 - 1e-7)
    y = np.asarray(targets)
    losses = -(y * np.log(probs) + (1 - y) * np.log(1 - probs)).mean(axis=1)
    pred = predicted_sets(probs, thresholds)
    order = np.argsort(-losses, kind="stable")[:count]
    return [{"path": paths[i], "loss": float(losses[i]),
             "true": [classes[c] for c in np.flatnonzero(y[i])],
             "predicted": [classes[c] for c in np.flatnonzero(pred[i])]} for i in order]
