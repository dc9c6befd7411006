"""The loss and the per-epoch score, for either task, told apart by the targets themselves.

Single-label targets are class indices (N,): softmax cross-entropy, and the score is accuracy.
Multi-label targets are multi-hot float rows (N, C) (``data.datasets.label_targets``): one sigmoid per
label with binary cross-entropy, and the score is mAP (macro average precision over the labels that
have positives) — accuracy of the argmax means nothing when an image holds several labels, and mAP
does not depend on the thresholds, which are tuned after training (``training/thresholds.py``).
The head stage, the boundary top and the full fine-tuning loop all call these two, so the metrics
columns' ``*_accuracy`` hold the task's score and the best-epoch choice (``selection_score``) follows it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multilabel_average_precision

__all__ = ["Tally", "is_multilabel", "loss", "mean_average_precision"]


def is_multilabel(targets: torch.Tensor) -> bool:
    return targets.ndim == 2 and targets.is_floating_point()


def loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0,
         reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy (class indices) or binary cross-entropy averaged over the labels (multi-hot rows,
    smoothed toward 1/2 by `label_smoothing`, as cross-entropy smooths toward 1/C)."""
    if not is_multilabel(targets):
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing, reduction=reduction)
    soft = targets * (1 - label_smoothing) + label_smoothing / 2
    per_image = F.binary_cross_entropy_with_logits(logits.float(), soft, reduction="none").mean(dim=1)
    return per_image.sum() if reduction == "sum" else per_image.mean()


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Macro AP over the labels with at least one positive (a label absent from the data has no AP);
    NaN when none has."""
    present = targets.sum(dim=0) > 0
    if not bool(present.any()):
        return float("nan")
    per_label = multilabel_average_precision(scores[:, present].float(), targets[:, present].long(),
                                             num_labels=int(present.sum()), average=None)
    return float(per_label.mean())


class Tally:
    """The epoch's score, batch by batch: accuracy from counted hits, or mAP from the kept outputs
    (an epoch's N x C scores are small)."""

    def __init__(self) -> None:
        self.correct, self.n = 0, 0
        self._scores: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []

    @property
    def multilabel(self) -> bool:
        return bool(self._scores)

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        logits = logits.detach()
        if is_multilabel(targets):
            self._scores.append(logits.float().cpu())
            self._targets.append(targets.detach().cpu())
        else:
            self.correct += int((logits.argmax(1) == targets).sum())
        self.n += len(targets)

    def value(self) -> float:
        if not self.n:
            return math.nan
        if self._scores:
            return mean_average_precision(torch.cat(self._scores), torch.cat(self._targets))
        return self.correct / self.n
