"""Linear probes on frozen features: how well a backbone separates *your* classes, for pennies.

A logistic regression on standardised features is the standard yardstick of a representation (it is
what the head stage of training does, without the epochs). C is chosen by stratified k-fold on the
train split; the chosen probe is scored on the val split. The learning curve refits the probe on
1, 2, 5, ... images per class of the same cached features, so it costs no forward pass at all.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["PROBE_CS", "ProbeResult", "cv_folds", "learning_curve", "learning_curve_sizes", "linear_probe",
           "out_of_fold_probabilities"]

PROBE_CS = (0.01, 0.1, 1.0, 10.0)  # inverse L2 strengths: from heavily regularised to nearly free
MAX_FOLDS = 5
LEARNING_CURVE_STEPS = (1, 2, 5, 10, 20)  # images per class; "all" is always added
LEARNING_CURVE_REPEATS = 3  # random subsets averaged per size (1 for "all": there is only one)
DEFAULT_C = 1.0  # used when a class has a single train image and no fold can be formed


@dataclass
class ProbeResult:
    """The chosen probe and its scores."""

    c: float
    val_accuracy: float
    cv_accuracy: float | None  # mean over folds at the chosen C; None when no CV was possible
    folds: int  # 0 when no CV was possible
    cv_scores: dict[str, float]  # str(C) -> mean CV accuracy

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _probe(c: float, max_iter: int = 1000):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))


def _fit_score(c: float, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> float:
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        # a probe that has not fully converged after 1000 lbfgs steps still ranks backbones correctly
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = _probe(c).fit(x_train, y_train)
    return float((model.predict(x_test) == y_test).mean())


def cv_folds(labels: Sequence[int], max_folds: int = MAX_FOLDS) -> int:
    """Stratified folds possible: at most `max_folds`, at most the smallest class; 0 below 2."""
    counts = np.bincount(np.asarray(labels))
    smallest = int(counts[counts > 0].min()) if counts.any() else 0
    folds = min(max_folds, smallest)
    return folds if folds >= 2 else 0


def linear_probe(train_x, train_y, val_x, val_y, *, cs: Sequence[float] = PROBE_CS, max_folds: int = MAX_FOLDS,
                 seed: int = 0) -> ProbeResult:
    """Pick C by stratified k-fold accuracy on train (ties: the smaller C), refit on all of train,
    score on val. Inputs: tensors or arrays of features [N, D] and integer labels [N]."""
    from sklearn.model_selection import StratifiedKFold

    x, y = np.asarray(train_x, dtype=np.float32), np.asarray(train_y)
    folds = cv_folds(y, max_folds)
    scores: dict[str, float] = {}
    if folds:
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        splits = list(splitter.split(x, y))
        for c in cs:
            scores[str(c)] = float(np.mean([_fit_score(c, x[a], y[a], x[b], y[b]) for a, b in splits]))
        best_c = max(cs, key=lambda c: (scores[str(c)], -c))
    else:
        best_c = DEFAULT_C
    val = _fit_score(best_c, x, y, np.asarray(val_x, dtype=np.float32), np.asarray(val_y))
    return ProbeResult(c=best_c, val_accuracy=val, cv_accuracy=scores.get(str(best_c)), folds=folds, cv_scores=scores)


def learning_curve_sizes(class_counts: Sequence[int], steps: Sequence[int] = LEARNING_CURVE_STEPS) -> list[int]:
    """Images per class to try: the steps below the largest class, then the largest class ("all")."""
    top = max(int(n) for n in class_counts)
    return [s for s in steps if s < top] + [top]


def _subsample(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    picked = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(picked))


def learning_curve(train_x, train_y, val_x, val_y, *, c: float, sizes: Sequence[int] | None = None,
                   repeats: int = LEARNING_CURVE_REPEATS, seed: int = 0) -> list[dict[str, Any]]:
    """[{per_class, images, accuracy, std}] for each size: val accuracy of the probe (fixed C) fit on
    `per_class` random train images of each class (all of a smaller class), mean of `repeats` draws."""
    x, y = np.asarray(train_x, dtype=np.float32), np.asarray(train_y)
    vx, vy = np.asarray(val_x, dtype=np.float32), np.asarray(val_y)
    counts = np.bincount(y)
    sizes = list(sizes) if sizes is not None else learning_curve_sizes(counts[counts > 0])
    rng = np.random.default_rng(seed)
    top = int(counts.max())
    points = []
    for size in sizes:
        draws = 1 if size >= top else repeats
        subsets = [_subsample(y, size, rng) for _ in range(draws)]
        accs = [_fit_score(c, x[idx], y[idx], vx, vy) for idx in subsets]
        points.append({"per_class": int(size), "images": len(subsets[0]), "all": size >= top,
                       "accuracy": float(np.mean(accs)), "std": float(np.std(accs))})
    return points


def out_of_fold_probabilities(x, y, num_classes: int, *, c: float = DEFAULT_C, max_folds: int = MAX_FOLDS,
                              seed: int = 0, max_iter: int = 300) -> np.ndarray:
    """[N, num_classes] class probabilities of each image from a probe that never saw it: stratified
    k-fold (at most `max_folds`, at least 2, even when a class has fewer images than folds), each fold
    predicted by the probe fit on the others. A class absent from a fold's training part gets
    probability 0 there. `max_iter` is lower than the ranking probes': these probabilities only rank
    images by how much the rest of the data disagrees with their label, which needs no last digit."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import StratifiedKFold

    x, y = np.asarray(x, dtype=np.float32), np.asarray(y)
    counts = np.bincount(y, minlength=num_classes)
    # StratifiedKFold needs as many images as folds in total and warns when a class has fewer
    folds = max(2, min(max_folds, int(counts[counts > 0].max(initial=0)), len(y)))
    probs = np.zeros((len(y), num_classes), dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for train, held_out in StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(x, y):
            seen = np.unique(y[train])
            if len(seen) < 2:  # one class only: nothing to discriminate, it takes all the probability
                probs[np.ix_(held_out, seen)] = 1.0
                continue
            model = _probe(c, max_iter).fit(x[train], y[train])
            probs[np.ix_(held_out, model.classes_)] = model.predict_proba(x[held_out])
    return probs
