"""Which images probably carry the wrong label: confident learning on out-of-fold probabilities.

The method of Northcutt, Jiang & Chuang, "Confident Learning: Estimating Uncertainty in Dataset Labels"
(JAIR 2021), in the few lines it takes (cleanlab, its reference implementation, is AGPL and does not fit
an Apache-2.0 tool):

* each class j gets a threshold t_j, the mean probability of j over the images labelled j: how sure
  the probe is, on average, of the images it should be sure of (per class, so a hard class is not
  judged by an easy one's confidence);
* an image "confidently belongs" to every class whose probability reaches that class's threshold; it
  is counted under the likeliest of those (the confident joint). Counted under a class other than its
  label, it is a label-issue candidate, and that class is the suggested label;
* candidates are ranked by self-confidence, the probability of their own label (lowest first): the
  ranking the paper and cleanlab find best for finding errors among the candidates.

The probabilities must come from a model that did not see the image (``probe.out_of_fold_probabilities``):
a model that trained on a mislabelled image has learnt its wrong label.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["LabelIssue", "class_thresholds", "find_label_issues"]


@dataclass(frozen=True)
class LabelIssue:
    index: int  # row of the probabilities
    self_confidence: float  # probability of its own label
    suggested: int  # the class it confidently belongs to instead
    suggested_probability: float


def class_thresholds(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """t_j: the mean probability of class j over the images labelled j (1.0 for a class without images,
    so no image confidently belongs to it)."""
    num_classes = probs.shape[1]
    thresholds = np.ones(num_classes)
    for j in range(num_classes):
        mine = labels == j
        if mine.any():
            thresholds[j] = probs[mine, j].mean()
    return thresholds


def find_label_issues(probs: np.ndarray, labels: np.ndarray) -> list[LabelIssue]:
    """Label-issue candidates among N images given their out-of-fold probabilities [N, C] and labels [N],
    lowest self-confidence first."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    thresholds = class_thresholds(probs, labels)
    # classes each image confidently belongs to; the likeliest of them is where the confident joint counts it
    above = np.where(probs >= thresholds[None, :] - 1e-12, probs, -1.0)
    counted_as = above.argmax(axis=1)
    confident = above.max(axis=1) >= 0
    rows = np.arange(len(labels))
    self_confidence = probs[rows, labels]
    issues = np.flatnonzero(confident & (counted_as != labels))
    order = issues[np.argsort(self_confidence[issues], kind="stable")]
    return [LabelIssue(index=int(i), self_confidence=float(self_confidence[i]), suggested=int(counted_as[i]),
                       suggested_probability=float(probs[i, counted_as[i]])) for i in order]
