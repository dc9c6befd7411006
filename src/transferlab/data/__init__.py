"""Data layer: read image folders or CSVs, validate images, build transforms and datasets.

Names load lazily (PEP 562): importing ``transferlab.data.images`` must not pull in torch, so that
ONNX prediction and serving (``transferlab.export``) run without the training stack.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "ImageDataset": "datasets",
    "default_datasets_root": "digits",
    "materialize_digits": "digits",
    "IMAGE_EXTENSIONS": "images",
    "MAX_PIXELS": "images",
    "ImageError": "images",
    "file_digest": "images",
    "has_image_extension": "images",
    "load_image": "images",
    "probe_image": "images",
    "LAYOUT_CLASS_FOLDERS": "sources",
    "LAYOUT_CSV": "sources",
    "LAYOUT_SPLIT_FOLDERS": "sources",
    "SPLITS": "splits",
    "DataSplits": "sources",
    "Sample": "sources",
    "load_splits": "sources",
    "AUGMENT_PRESETS": "transforms",
    "IMAGENET_MEAN": "transforms",
    "IMAGENET_STD": "transforms",
    "Preprocessing": "transforms",
    "eval_transform": "transforms",
    "train_transform": "transforms",
}

__all__ = [
    "AUGMENT_PRESETS", "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS", "LAYOUT_CLASS_FOLDERS", "LAYOUT_CSV",
    "LAYOUT_SPLIT_FOLDERS", "MAX_PIXELS", "SPLITS", "DataSplits", "ImageDataset", "ImageError", "Preprocessing",
    "Sample", "default_datasets_root", "eval_transform", "file_digest", "has_image_extension", "load_image",
    "load_splits", "materialize_digits", "probe_image", "train_transform",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
