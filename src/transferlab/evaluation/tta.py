"""Test-time augmentation: average the softmax over a few deterministic views of each image.

Views are taken from the already preprocessed batch (resized, cropped, normalised), so they cost one
forward pass each and no extra decoding: the image itself, its mirror, and a 0.9 centre crop (zoomed
back to the input size) of both. Flips and mild crops are what the training augmentation taught the
model to be invariant to; corner crops would add passes for little gain on centred subjects.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.transforms.v2 import functional as F

__all__ = ["CROP_RATIO", "TTA_VIEWS", "tta_logits"]

CROP_RATIO = 0.9


def _centre_crop(x: torch.Tensor, ratio: float = CROP_RATIO) -> torch.Tensor:
    h, w = x.shape[-2:]
    ch, cw = max(1, round(h * ratio)), max(1, round(w * ratio))
    return F.resized_crop(x, (h - ch) // 2, (w - cw) // 2, ch, cw, [h, w], antialias=True)


TTA_VIEWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "full": lambda x: x,
    "flip": F.horizontal_flip,
    "crop": _centre_crop,
    "crop+flip": lambda x: F.horizontal_flip(_centre_crop(x)),
}
"""View name -> function on a (B, C, H, W) batch; "full" must stay first: it is the plain prediction."""


def tta_logits(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """(views, B, C) float32 logits of one batch, views in TTA_VIEWS order (the plain one first); the
    caller averages their (calibrated) softmax."""
    return torch.stack([model(view(batch)).float() for view in TTA_VIEWS.values()])
