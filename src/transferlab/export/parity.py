"""Does the exported file compute what the trained model computes? Checked on real images, end to end.

Reference: the run's PyTorch model in fp32 eager with its torchvision eval transform (what `predict`
and `evaluate` use). Candidate: the exported file fed by ``preprocess.py`` (PIL + numpy), as it runs in
deployment. Compared on probabilities, at batch 1 and, for dynamic-batch exports, all images at once.

Tolerances (max |Δ probability|): fp32 1e-4 with identical top-1 everywhere. fp16 keeps ~3 significant
digits, so 1e-2, and top-1 may differ only where the reference's two best classes are within 2 × 1e-2
(a near-tie that half precision can legitimately flip).

A multi-label model is compared on its sigmoid probabilities, and on its decisions: the set of labels
at or above their thresholds must be identical, except (fp16) where a reference probability lies
within 2 × 1e-2 of its label's threshold.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from transferlab.errors import TransferlabError
from transferlab.export.predictors import sigmoid, softmax
from transferlab.export.preprocess import preprocess_image

__all__ = ["TOLERANCES", "ParityError", "check_parity", "parity_images"]

log = logging.getLogger("transferlab")

TOLERANCES: dict[str, float] = {"fp32": 1e-4, "fp16": 1e-2}


class ParityError(TransferlabError):
    """Raised by the exporter (as a TransferlabError) when an exported file disagrees with its model."""


def _generated_images(n: int, seed: int = 0) -> list[Image.Image]:
    """Smooth colour gradients plus noise, in assorted shapes (resize and crop paths all exercised)."""
    rng = np.random.default_rng(seed)
    shapes = [(224, 224), (160, 300), (300, 160), (97, 131), (512, 384), (64, 64), (33, 250), (250, 33)]
    images = []
    for i in range(n):
        h, w = shapes[i % len(shapes)]
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], axis=-1) * rng.uniform(80, 255, size=3)
        pixels = np.clip(base + rng.normal(0, 25, size=(h, w, 3)), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(pixels))
    return images


def parity_images(run_dir: Path, classes: list[str], n: int = 8) -> tuple[list[Image.Image], str]:
    """Up to `n` images from the run's validation split (evenly spread over it), else generated ones."""
    from transferlab.data.images import ImageError, load_image
    from transferlab.evaluation.samples import eval_data

    try:
        samples = eval_data(run_dir, classes, split="val", progress=False).samples
    except (TransferlabError, OSError, ValueError) as exc:
        log.info("parity check on generated images: the run's validation data is not readable (%s)", exc)
        samples = []
    picked = [samples[int(i)] for i in np.linspace(0, len(samples) - 1, min(n, len(samples)))] if samples else []
    images = []
    for sample in picked:
        try:
            images.append(load_image(sample.path))
        except ImageError:
            continue
    if images:
        return images, f"{len(images)} images from the run's validation split"
    return _generated_images(n), f"{n} generated images (validation data unavailable)"


def check_parity(reference: Any, preprocessing: Any, candidate: Callable[[np.ndarray], np.ndarray],
                 images: list[Image.Image], *, precision: str, dynamic_batch: bool,
                 thresholds: list[float] | None = None) -> dict[str, Any]:
    """Compare `candidate` (numpy batch → logits) with `reference` (the torch model) on `images`.
    `thresholds`: the model is multi-label (sigmoid outputs), decided at these per-label thresholds.

    Returns the report stored in the sidecar; ``passed`` says whether it is within tolerance."""
    import torch

    from transferlab.data.transforms import eval_transform

    activation = softmax if thresholds is None else sigmoid
    transform = eval_transform(preprocessing)
    with torch.inference_mode():
        expected = activation(reference(torch.stack([transform(im) for im in images])).float().numpy())
    inputs = np.stack([preprocess_image(im, preprocessing.to_dict()) for im in images])
    runs = {1: np.concatenate([activation(candidate(inputs[i:i + 1])) for i in range(len(inputs))])}
    if dynamic_batch and len(inputs) > 1:
        runs[len(inputs)] = activation(candidate(inputs))
    tolerance = TOLERANCES[precision]
    if thresholds is None:
        top2 = np.sort(expected, axis=1)[:, -2:] if expected.shape[1] > 1 else np.zeros((len(expected), 2))
        near_tie = top2[:, 1] - top2[:, 0] <= 2 * tolerance
        decide = lambda p: p.argmax(axis=1)[:, None]
    else:
        cut = np.asarray(thresholds)[None, :]
        near_tie = (np.abs(expected - cut) <= 2 * tolerance).any(axis=1)
        decide = lambda p: p >= cut
    if precision != "fp16":
        near_tie = np.zeros(len(images), bool)
    worst, differs = 0.0, np.zeros(len(images), dtype=bool)
    for got in runs.values():
        worst = max(worst, float(np.abs(got - expected).max()))
        differs |= (decide(got) != decide(expected)).any(axis=1)
    return {
        "passed": bool(worst <= tolerance and not (differs & ~near_tie).any()),
        "precision": precision,
        "tolerance": tolerance,
        "max_abs_diff": worst,
        "images": len(images),
        "top1_identical": int((~differs).sum()),
        "top1_flips_at_near_ties": int((differs & near_tie).sum()),
        "batch_sizes": sorted(runs),
        **({} if thresholds is None else {"outputs": "sigmoid", "compared": "probabilities and label sets"}),
    }
