"""Classification metrics from predicted probabilities: scikit-learn and torchmetrics do the maths.

Every per-class metric is computed over *all* the model's classes (``labels=range(C)``), so a class
absent from the evaluation data still has its row (support 0, zeros by ``zero_division=0``) and the
confusion matrix is always C×C. Macro averages include such rows, as scikit-learn's report does;
``absent_classes`` names them so a reader can tell why a macro average is low.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    log_loss,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)
from torchmetrics.functional.classification import multiclass_calibration_error

__all__ = ["ECE_BINS", "TOP_K", "classification_metrics", "reliability_bins"]

TOP_K = 5
ECE_BINS = 15


def classification_metrics(
    probabilities: np.ndarray, targets: np.ndarray, classes: Sequence[str], *, n_bins: int = ECE_BINS
) -> dict[str, Any]:
    """JSON-ready metrics for (N, C) probabilities against N integer targets in [0, C)."""
    probs = _normalised(probabilities)
    y = np.asarray(targets, dtype=np.int64)
    n_classes = len(classes)
    if probs.ndim != 2 or probs.shape != (len(y), n_classes):
        raise ValueError(f"probabilities {probs.shape} do not match {len(y)} targets × {n_classes} classes")
    if len(y) == 0:
        raise ValueError("no predictions to score")
    labels = list(range(n_classes))
    pred = probs.argmax(axis=1)
    k = min(TOP_K, n_classes)
    per_p, per_r, per_f, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    averages = {
        avg: dict(zip(("precision", "recall", "f1"),
                      map(float, precision_recall_fscore_support(y, pred, labels=labels, average=avg,
                                                                 zero_division=0)[:3])))
        for avg in ("macro", "weighted")
    }
    with warnings.catch_warnings():
        # classes predicted but absent from y: balanced accuracy averages recall over present classes
        warnings.simplefilter("ignore")
        balanced = balanced_accuracy_score(y, pred)
    ece, bins = _calibration(probs, y, n_bins)
    return {
        "n": len(y),
        "num_classes": n_classes,
        "accuracy": float(accuracy_score(y, pred)),
        "top_k": k,
        # k >= C is trivially perfect (and scikit-learn rejects 2-D scores for two classes)
        "top_k_accuracy": 1.0 if k >= n_classes else float(top_k_accuracy_score(y, probs, k=k, labels=labels)),
        "balanced_accuracy": float(balanced),
        "log_loss": float(log_loss(y, probs, labels=labels)),
        "ece": ece,
        "macro": averages["macro"],
        "weighted": averages["weighted"],
        "per_class": [
            {"class": name, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(classes, per_p, per_r, per_f, support)
        ],
        "absent_classes": [name for name, s in zip(classes, support) if s == 0],
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).tolist(),
        "reliability": bins,
    }


def reliability_bins(probabilities: np.ndarray, targets: np.ndarray, n_bins: int = ECE_BINS) -> list[dict[str, Any]]:
    """Per equal-width confidence bin: [lower, upper), count, mean confidence, accuracy (None if empty)."""
    return _calibration(_normalised(probabilities), np.asarray(targets, dtype=np.int64), n_bins)[1]


def _normalised(probabilities: np.ndarray) -> np.ndarray:
    """float64 rows summing to 1: float32 softmax outputs drift by ~1e-7, which log_loss warns about."""
    probs = np.asarray(probabilities, dtype=np.float64)
    return probs / probs.sum(axis=1, keepdims=True)


def _calibration(probs: np.ndarray, y: np.ndarray, n_bins: int) -> tuple[float, list[dict[str, Any]]]:
    """ECE from torchmetrics plus the bins behind it, binned exactly as torchmetrics bins.

    torchmetrics' bins are [lo, hi), so a confidence of exactly 1.0 (common after float32 softmax)
    would fall in a 16th bin of its own. Nudging it one float below 1.0 puts it in the last bin, as
    in the usual definition (M equal-width bins covering [0, 1], Guo et al. 2017), so the
    reliability diagram and the ECE describe the same 15 bins.
    """
    preds = torch.from_numpy(probs).float()
    conf, pred = preds.max(dim=1)
    below_one = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0))
    preds = preds.scatter(1, pred[:, None], conf.clamp(max=below_one)[:, None])
    target = torch.from_numpy(y)
    ece = float(multiclass_calibration_error(preds, target, num_classes=probs.shape[1], n_bins=n_bins, norm="l1"))

    conf = conf.clamp(max=below_one)
    correct = pred.eq(target).float()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=conf.dtype)
    index = torch.bucketize(conf, edges, right=True) - 1
    bins = []
    for b in range(n_bins):
        members = index == b
        count = int(members.sum())
        bins.append({
            "lower": round(float(edges[b]), 6),
            "upper": round(float(edges[b + 1]), 6),
            "count": count,
            "confidence": float(conf[members].mean()) if count else None,
            "accuracy": float(correct[members].mean()) if count else None,
        })
    return ece, bins
