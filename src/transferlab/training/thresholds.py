"""Per-label decision thresholds of a multi-label model, tuned on the validation split after training.

One sigmoid per label gives a probability; where to cut it depends on the label (a rare label's
probabilities rarely reach 0.5). Each label's threshold maximises its F1 on val (``rule="f1"``), or is
the lowest one reaching a target precision (``rule="precision:0.9"``: the most recall at that
precision). They are saved in model.json (``thresholds``, in ``classes`` order) and travel into the
export sidecar; predict returns every label at or above its threshold.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from transferlab.data.datasets import DecodedImages, ImageDataset
from transferlab.data.multilabel import DEFAULT_THRESHOLD  # a label with no val positive keeps it
from transferlab.data.sources import Sample
from transferlab.data.transforms import Preprocessing, eval_transform, eval_view

__all__ = ["DEFAULT_THRESHOLD", "tune_thresholds", "validation_probabilities"]

log = logging.getLogger("transferlab")


def _cut_between(scores_desc: np.ndarray, k: int) -> float:
    """A threshold keeping the k highest scores (k >= 1): midway to the next lower score, so an unseen
    image scoring a little under the last kept one still counts."""
    if k >= len(scores_desc):
        return float(scores_desc[-1]) / 2
    return float(scores_desc[k - 1] + scores_desc[k]) / 2


def _tune_one(scores: np.ndarray, positives: np.ndarray, rule: str) -> tuple[float, dict[str, Any]]:
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], positives[order].astype(np.float64)
    n_pos = y.sum()
    if n_pos == 0:
        return DEFAULT_THRESHOLD, {"reason": "no validation positive"}
    tp = np.cumsum(y)  # predicting the k = i + 1 highest scores positive
    k = np.arange(1, len(s) + 1)
    # only cut where the score changes: tied scores are kept or dropped together
    ends = np.r_[s[1:] != s[:-1], True]
    precision, recall = tp / k, tp / n_pos
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    if rule == "f1":
        best = int(np.argmax(np.where(ends, f1, -1)))
    else:
        target = float(rule.partition(":")[2])
        reaching = np.flatnonzero(ends & (precision >= target - 1e-12))
        if len(reaching) == 0:
            best = int(np.argmax(np.where(ends, f1, -1)))
            return _cut_between(s, best + 1), {"f1": float(f1[best]), "precision": float(precision[best]),
                                               "recall": float(recall[best]),
                                               "reason": f"precision {target:g} not reached on val: best F1 used"}
        best = int(reaching[-1])  # the most images (recall) at that precision
    return _cut_between(s, best + 1), {"f1": float(f1[best]), "precision": float(precision[best]),
                                       "recall": float(recall[best])}


def tune_thresholds(probabilities: np.ndarray, targets: np.ndarray, classes: Sequence[str],
                    rule: str = "f1") -> tuple[list[float], dict[str, dict[str, Any]]]:
    """(threshold per label, what each achieves on these data) for (N, C) probabilities and (N, C) 0/1
    targets."""
    thresholds, report = [], {}
    for c, name in enumerate(classes):
        threshold, info = _tune_one(np.asarray(probabilities[:, c], np.float64), np.asarray(targets[:, c]) > 0, rule)
        thresholds.append(round(min(max(threshold, 1e-6), 1.0), 6))
        report[name] = {"threshold": thresholds[-1], **info}
    return thresholds, report


@torch.no_grad()
def validation_probabilities(model: torch.nn.Module, samples: Sequence[Sample], pre: Preprocessing, *,
                             batch_size: int = 64, decoded: DecodedImages | None = None) -> np.ndarray:
    """Sigmoid probabilities (N, C) of `model` on `samples` through the eval transform, in full precision
    as predict runs it (the val views the run kept are reused)."""
    was_training = model.training
    model.eval()
    dataset = ImageDataset(samples, eval_transform(pre), decoded=decoded, exact_pixels=True,
                           kept_view=eval_view(pre) if decoded is not None else None)
    out = [model(x).float().sigmoid() for x, _ in DataLoader(dataset, batch_size=batch_size, shuffle=False)]
    model.train(was_training)
    return torch.cat(out).numpy()
