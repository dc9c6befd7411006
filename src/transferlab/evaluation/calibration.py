"""Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks"): one scalar T > 0
fitted on the val logits by minimising the negative log-likelihood; calibrated probabilities are
``softmax(logits / T)``. T > 1 softens an over-confident model, T < 1 sharpens an under-confident one
(label smoothing, which training uses by default, tends to give T < 1). Dividing by a positive scalar
never changes the arg-max, so accuracy is untouched.

The fitted T lives in model.json's ``"calibration"`` entry (with the val scores that ``abstain.py``
derives its thresholds from); a model.json without that entry (a run trained before calibration
existed, or with ``--no-calibrate``) means T = 1. Exports divide inside the graph (:class:`Tempered`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from transferlab.errors import RunDirError
from transferlab.evaluation import abstain

__all__ = ["T_RANGE", "Tempered", "calibration_record", "fit_temperature", "scaled_softmax", "temperature_of"]

# A val split the model separates perfectly drives the NLL optimum towards T -> 0 (ever sharper, never
# wrong on val): the bounds keep T a finite, sane factor either way.
T_RANGE = (0.05, 20.0)


def fit_temperature(logits: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor) -> float:
    """The T minimising the mean NLL of softmax(logits / T) on (N, C) logits and N integer targets.

    LBFGS over log T (Guo et al.'s reference code optimises T itself; log T keeps it positive without a
    constraint), in float64 so a few hundred val images give the same T on every platform."""
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    if z.ndim != 2 or len(z) != len(y) or len(y) == 0:
        raise ValueError(f"need (N, C) logits and N targets, got {tuple(z.shape)} and {tuple(y.shape)}")
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")
    lo, hi = math.log(T_RANGE[0]), math.log(T_RANGE[1])

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(z / log_t.clamp(lo, hi).exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    t = float(log_t.detach().clamp(lo, hi).exp())
    return t if math.isfinite(t) else 1.0


def scaled_softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T) in float64, (N, C): the precision metrics.py scores in."""
    return torch.from_numpy(np.asarray(logits, dtype=np.float64) / temperature).softmax(dim=1).numpy()


class Tempered(nn.Module):
    """`model`'s logits divided by T: what exports trace, so the graph's output is calibrated logits."""

    def __init__(self, model: nn.Module, temperature: float) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("inverse_temperature", torch.tensor(1.0 / temperature, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) * self.inverse_temperature


def temperature_of(meta: dict[str, Any]) -> float:
    """T from model.json (or an export sidecar); 1.0 when it has no calibration entry (older runs)."""
    entry = meta.get("calibration")
    if entry is None:
        return 1.0
    t = entry.get("temperature") if isinstance(entry, dict) else None
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
        raise RunDirError(f"model.json's calibration temperature is {t!r}, not a positive number; recalibrate "
                          "with `transferlab evaluate RUN --calibrate` or retrain.")
    return float(t)


def calibration_record(logits: np.ndarray, targets: np.ndarray, classes: list[str], *, fit: bool = True
                       ) -> dict[str, Any]:
    """model.json's ``"calibration"`` entry from the val split's raw logits: T (1 without `fit`), val NLL
    and ECE before and after, and the val scores ``abstain.py`` computes thresholds and conformal
    quantiles from."""
    # metrics loads sklearn and torchmetrics: a predict that only reads T (temperature_of) does without them
    from transferlab.evaluation.metrics import ECE_BINS, classification_metrics

    targets = np.asarray(targets, dtype=np.int64)
    # Without a single val error the NLL falls for ever as T -> 0 (every val answer right, so sharper is
    # always better): val cannot measure over-confidence then, and any T would be the bound, not a fit.
    separable = bool((np.asarray(logits).argmax(axis=1) == targets).all())
    fitted = fit and not separable
    t = fit_temperature(logits, targets) if fitted else 1.0
    before = classification_metrics(scaled_softmax(logits, 1.0), targets, classes)
    probs = scaled_softmax(logits, t)
    after = classification_metrics(probs, targets, classes) if fitted else before
    return {
        "method": "temperature" if fitted else "none",
        **({"note": "no val image is misclassified, so val cannot measure over-confidence: T = 1"}
           if fit and separable else {}),
        "temperature": round(t, 6),
        "fitted_on": "val",
        "n": len(targets),
        "ece_bins": ECE_BINS,
        "val_log_loss": {"before": before["log_loss"], "after": after["log_loss"]},
        "val_ece": {"before": before["ece"], "after": after["ece"]},
        "val_scores": abstain.val_scores(probs, targets),
    }
