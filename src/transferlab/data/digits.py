"""A real, offline dataset for the demo: scikit-learn's handwritten digits as class folders.

scikit-learn ships the 1 797 8x8 images in its package data, so ``transferlab demo`` can
train end to end without any download, through exactly the same folder loader as user data.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from transferlab.paths import home

__all__ = ["DIGITS_COUNT", "default_datasets_root", "materialize_digits"]

DIGITS_COUNT = 1797
_SIZE = 32  # 8x8 upsampled (nearest: keeps the original pixels exactly)
_MARKER = ".complete"  # hidden, so the folder loader ignores it


def default_datasets_root() -> Path:
    """``$TRANSFERLAB_HOME/datasets``, defaulting to ``~/.cache/transferlab/datasets``."""
    return home() / "datasets"


def _is_complete(folder: Path) -> bool:
    marker = folder / _MARKER
    try:
        return marker.read_text().strip() == str(DIGITS_COUNT)
    except OSError:
        return False


def _write_pngs(folder: Path) -> None:
    from sklearn.datasets import (
        load_digits,
    )  # lazy: importing sklearn costs about a second

    digits = load_digits()
    for label in range(10):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
    for index, (pixels, label) in enumerate(
        zip(digits.images, digits.target, strict=True)
    ):
        gray = np.rint(pixels * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
        image = Image.fromarray(gray).resize((_SIZE, _SIZE), Image.Resampling.NEAREST)
        image.save(folder / str(label) / f"{index:04d}.png")
    (folder / _MARKER).write_text(f"{len(digits.images)}\n")


def materialize_digits(root: Path | None = None) -> Path:
    """Write the digits as ``<root>/digits/<0..9>/<index>.png`` once; return that folder.

    Idempotent: a complete copy (marker file with the image count) is reused. Files are
    written to a temporary folder and renamed into place, so an interrupted or concurrent
    run never leaves a half-written dataset behind.
    """
    root = Path(root).expanduser() if root is not None else default_datasets_root()
    target = root / "digits"
    if _is_complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".digits-", dir=root))
    try:
        _write_pngs(staging)
        if target.exists():
            shutil.rmtree(target)  # incomplete leftover from an interrupted run
        try:
            staging.rename(target)
        except OSError:
            if not _is_complete(
                target
            ):  # lost a race against another process? fine if so
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
