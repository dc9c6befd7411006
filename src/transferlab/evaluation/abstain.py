"""Saying "I don't know": abstention below a confidence threshold, and split-conformal prediction sets.

Both are derived from the val split's calibrated probabilities, kept in model.json (and an export's
sidecar) as ``val_scores``: per val image its top probability, whether that top label was right, and
the probability it gave the true label. So predict needs no val data, and any target precision or
coverage can be asked for at predict time. numpy only: the ONNX path (no torch) uses it too.

- ``unknown="auto"``: the lowest threshold whose answered val images reach `target_precision`
  (the largest val coverage at that precision); ``unknown=0.7``: that threshold as given. An image
  whose top probability is below it is labelled "unknown", with its candidates kept.
- ``sets=0.9``: split-conformal prediction sets with the LAC score (1 − probability of the true label;
  Sadinle et al. 2019, the score that gives the smallest sets on average), quantile at
  ceil((n+1)(1−α))/n of the n val scores (Angelopoulos & Bates 2021, "A Gentle Introduction to
  Conformal Prediction", §1): the set is every label whose probability is at least 1 − q̂, and holds the
  true label with probability ≥ 1 − α for images exchangeable with val. An empty set gets the top label
  (a superset keeps the guarantee). Val also chose the model's best epoch and T, so the guarantee is
  slightly optimistic; ``evaluate --split test`` measures the real coverage.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from transferlab.errors import TransferlabError

__all__ = [
    "DEFAULT_TARGET_PRECISION",
    "UNKNOWN",
    "AbstainOptions",
    "Abstainer",
    "conformal_quantile",
    "parse_unknown",
    "precision_threshold",
    "prediction_set",
    "risk_coverage",
    "selective_metrics",
    "val_scores",
]

UNKNOWN = "unknown"
DEFAULT_TARGET_PRECISION = 0.99
DEFAULT_SET_COVERAGE = 0.9  # what evaluate reports when no coverage is asked for
CURVE_POINTS = 101  # the risk-coverage curve is stored at this many coverages


def val_scores(probs: np.ndarray, targets: np.ndarray) -> dict[str, list]:
    """The per-image val quantities thresholds and quantiles are computed from (6 decimals: JSON stays
    ~25 bytes an image, far below the resolution any threshold needs)."""
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    top = probs.argmax(axis=1)
    return {
        "confidence": np.round(probs.max(axis=1), 6).tolist(),
        "correct": (top == targets).astype(int).tolist(),
        "true_probability": np.round(probs[np.arange(len(targets)), targets], 6).tolist(),
    }


def precision_threshold(confidence: Sequence[float], correct: Sequence[int], target: float
                        ) -> tuple[float, float, float]:
    """(threshold, coverage, precision): the lowest top-probability threshold at which the images answered
    (confidence ≥ threshold) are right at least `target` of the time. No threshold reaching it: one above
    every confidence (coverage 0, precision nan)."""
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=np.float64)
    order = np.argsort(-conf, kind="stable")
    conf, ok = conf[order], ok[order]
    precision = np.cumsum(ok) / np.arange(1, len(ok) + 1)
    # a cut can only fall after the last of equal confidences: a threshold answers all of them or none
    boundary = np.append(conf[1:] < conf[:-1], True)
    good = np.flatnonzero(boundary & (precision >= target - 1e-12))
    if len(good) == 0:
        return float(np.nextafter(conf[0], np.inf)) if len(conf) else 1.0, 0.0, math.nan
    i = int(good[-1])
    return float(conf[i]), (i + 1) / len(conf), float(precision[i])


def conformal_quantile(true_probability: Sequence[float], coverage: float) -> float:
    """q̂ of the LAC scores 1 − p(true label): the ceil((n+1)(1−α))/n empirical quantile (α = 1 − coverage).
    1.0 (every label) when n is too small for the coverage asked (n < 1/α − 1)."""
    scores = 1.0 - np.asarray(true_probability, dtype=np.float64)
    n = len(scores)
    level = math.ceil((n + 1) * coverage) / n if n else math.inf
    if level > 1:
        return 1.0
    return float(np.quantile(scores, level, method="higher"))


def prediction_set(probs: np.ndarray, qhat: float) -> np.ndarray:
    """Indices of the labels with probability ≥ 1 − q̂, most probable first (never empty)."""
    order = np.argsort(-probs, kind="stable")
    keep = order[probs[order] >= 1.0 - qhat - 1e-9]
    return keep if len(keep) else order[:1]


def risk_coverage(confidence: np.ndarray, correct: np.ndarray, points: int = CURVE_POINTS) -> dict[str, Any]:
    """Risk (error rate of the answered images) against coverage (fraction answered) when answering the
    most confident first; `points` evenly spaced coverages, and the area under it (AURC, lower is better)."""
    order = np.argsort(-np.asarray(confidence, dtype=np.float64), kind="stable")
    wrong = 1.0 - np.asarray(correct, dtype=np.float64)[order]
    n = len(wrong)
    risk = np.cumsum(wrong) / np.arange(1, n + 1)
    at = np.unique(np.clip(np.round(np.linspace(1, n, min(points, n))).astype(int), 1, n)) - 1
    return {"coverage": [round((i + 1) / n, 6) for i in at], "risk": [round(float(risk[i]), 6) for i in at],
            "aurc": float(risk.mean())}


def parse_unknown(value: str | float | None) -> str | float | None:
    """The --unknown option: None (off), "auto", or a probability in (0, 1]."""
    if value is None or value == "auto":
        return value
    try:
        p = float(value)
    except (TypeError, ValueError):
        raise TransferlabError(f"--unknown must be 'auto' or a probability in (0, 1], got {value!r}") from None
    if not 0 < p <= 1:
        raise TransferlabError(f"--unknown must be 'auto' or a probability in (0, 1], got {value!r}")
    return p


@dataclass(frozen=True)
class AbstainOptions:
    """What predict is asked for: `unknown` ("auto", a probability, or None), the target precision
    "auto" aims at, and `sets` (a coverage in (0, 1), or None). Checked on construction."""

    unknown: str | float | None = None
    target_precision: float = DEFAULT_TARGET_PRECISION
    sets: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "unknown", parse_unknown(self.unknown))
        if not _fraction(self.target_precision):
            raise TransferlabError(f"--target-precision must be in (0, 1), got {self.target_precision!r}")
        if self.sets is not None and not _fraction(self.sets):
            raise TransferlabError(f"--sets must be a coverage in (0, 1), e.g. 0.9, got {self.sets!r}")

    @property
    def active(self) -> bool:
        return self.unknown is not None or self.sets is not None


@dataclass(frozen=True)
class Abstainer:
    """`AbstainOptions` resolved against a model's val scores: the threshold and q̂ to apply."""

    threshold: float | None  # answer when the top probability is at least this
    qhat: float | None
    val_coverage: float | None = None  # of the threshold, on val ("auto" and given thresholds alike)
    val_precision: float | None = None

    @classmethod
    def build(cls, options: AbstainOptions, calibration: dict[str, Any] | None, model: str) -> Abstainer | None:
        """None when nothing is asked; a clear error when "auto" or sets need val scores the model lacks."""
        if not options.active:
            return None
        scores = calibration.get("val_scores") if isinstance(calibration, dict) else None
        if not _valid_scores(scores):
            if options.unknown not in (None, "auto") and options.sets is None:
                return cls(float(options.unknown), None)  # a given threshold needs no val data
            raise TransferlabError(
                f"{model} carries no val scores (model.json's 'calibration' entry), which --unknown auto and --sets "
                "are computed from: it was trained or exported before they existed. Run `transferlab evaluate "
                "RUN --calibrate` (and re-export), or retrain.")
        threshold = coverage = precision = None
        if options.unknown == "auto":
            threshold, coverage, precision = precision_threshold(scores["confidence"], scores["correct"],
                                                                 options.target_precision)
        elif options.unknown is not None:
            threshold = float(options.unknown)
            answered = np.asarray(scores["confidence"]) >= threshold
            coverage = float(answered.mean())
            precision = float(np.asarray(scores["correct"])[answered].mean()) if answered.any() else math.nan
        qhat = conformal_quantile(scores["true_probability"], options.sets) if options.sets is not None else None
        return cls(threshold, qhat, coverage, None if precision is None or math.isnan(precision) else precision)

    def annotate(self, entry: dict[str, Any], probs: np.ndarray, classes: Sequence[str]) -> None:
        """Add the decision to one predict entry: "label" and "abstained" (with a threshold), "set"."""
        top = int(np.argmax(probs))
        if self.threshold is not None:
            abstained = bool(probs[top] < self.threshold)
            entry["label"] = UNKNOWN if abstained else classes[top]
            entry["abstained"] = abstained
        if self.qhat is not None:
            entry["set"] = [classes[i] for i in prediction_set(probs, self.qhat)]

    @property
    def fields(self) -> list[str]:
        """The entry keys `annotate` adds (CSV columns)."""
        return (["label", "abstained"] if self.threshold is not None else []) + (["set"] if self.qhat is not None else [])

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "val_coverage": self.val_coverage, "val_precision": self.val_precision,
                "conformal_qhat": self.qhat}


def _fraction(value: Any) -> bool:
    """A real number strictly between 0 and 1."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1


def _valid_scores(scores: Any) -> bool:
    return (isinstance(scores, dict) and all(isinstance(scores.get(k), list) for k in
                                             ("confidence", "correct", "true_probability"))
            and len(scores["confidence"]) > 0
            and len(scores["confidence"]) == len(scores["correct"]) == len(scores["true_probability"]))


def selective_metrics(probs: np.ndarray, targets: np.ndarray, calibration: dict[str, Any] | None, *,
                      target_precision: float = DEFAULT_TARGET_PRECISION,
                      coverage: float = DEFAULT_SET_COVERAGE) -> dict[str, Any]:
    """On evaluated data: the risk-coverage curve, and (when the model has val scores) what
    ``--unknown auto`` at `target_precision` and ``--sets coverage`` achieve here."""
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == targets
    out: dict[str, Any] = {"risk_coverage": risk_coverage(confidence, correct)}
    if not _valid_scores((calibration or {}).get("val_scores")):
        return out
    rule = Abstainer.build(AbstainOptions("auto", target_precision, coverage), calibration, "model")
    assert rule is not None and rule.threshold is not None and rule.qhat is not None
    answered = confidence >= rule.threshold
    sizes = [len(prediction_set(row, rule.qhat)) for row in probs]
    covered = [t in prediction_set(row, rule.qhat) for row, t in zip(probs, targets)]
    out["unknown_auto"] = {
        "target_precision": target_precision, "threshold": rule.threshold,
        "val_coverage": rule.val_coverage, "val_precision": rule.val_precision,
        "coverage": float(answered.mean()),
        "precision": float(correct[answered].mean()) if answered.any() else None,
    }
    out["sets"] = {"target_coverage": coverage, "score": "LAC", "qhat": rule.qhat,
                   "coverage": float(np.mean(covered)), "mean_size": float(np.mean(sizes))}
    return out
