"""The eval transform in PIL + numpy: exported models are fed exactly what training validated on,
without torch or torchvision.

It mirrors ``data.transforms.eval_transform`` step by step (torchvision's PIL kernels: resize the
short side to ``int(size / crop_pct)`` — the long side ``int(short * long / short_old)`` — then a
centre crop anchored at ``round((old - new) / 2)``, or a plain squash to size x size; scale to 0..1;
subtract mean, divide by std). ``tests/test_export.py`` pins the equality on many image shapes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from transferlab.data.images import resized_short_side

__all__ = ["preprocess_image"]

_RESAMPLE: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


def _resize_short_side(image: Image.Image, short: int, resample: Image.Resampling) -> Image.Image:
    size = resized_short_side(*image.size, short)  # ImageError (a "resize bomb") before resizing
    return image if size == image.size else image.resize(size, resample=resample)


def _center_crop(image: Image.Image, size: int) -> Image.Image:
    # PIL pads a crop box that leaves the image with zeros, as torchvision's pad-then-crop does.
    w, h = image.size
    top, left = round((h - size) / 2.0), round((w - size) / 2.0)
    return image.crop((left, top, left + size, top + size))


def preprocess_image(image: Image.Image, preprocessing: Mapping[str, Any], dtype: str = "float32") -> np.ndarray:
    """An RGB PIL image → a (3, size, size) normalised array, as the model's input expects."""
    size = int(preprocessing["input_size"])
    resample = _RESAMPLE[preprocessing.get("interpolation", "bicubic")]
    if preprocessing.get("crop_mode", "center") == "squash":
        image = image if image.size == (size, size) else image.resize((size, size), resample=resample)
    else:
        image = _center_crop(_resize_short_side(image, int(size / preprocessing["crop_pct"]), resample), size)
    pixels = np.asarray(image, dtype=np.float32) * np.float32(1.0 / 255)
    mean = np.asarray(preprocessing["mean"], dtype=np.float32)
    std = np.asarray(preprocessing["std"], dtype=np.float32)
    return ((pixels - mean) / std).transpose(2, 0, 1).astype(dtype, copy=False)
