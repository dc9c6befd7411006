"""Torch dataset over validated samples."""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from transferlab.data.images import ImageError, load_image
from transferlab.data.sources import Sample
from transferlab.data.transforms import EvalView

__all__ = ["DecodedImages", "ImageDataset", "label_targets"]

logger = logging.getLogger("transferlab")

_FALLBACK_SIZE = 256


class DecodedImages:
    """Decoded images kept in memory (uint8 RGB), so a file is decoded once per run, not once per epoch;
    and the validation images' eval views, so they are decoded and resized once per run too.

    Fine-tuning re-reads every train and val image each epoch; decoding a JPEG costs about as much
    as the augmentations applied to it. Images whose short side is at least twice `max_side` are
    stored reduced by the whole factor ``short side // max_side`` (a box filter: 10 ms for a 12-MP
    photo, where a LANCZOS resize took 142 ms), so what the augmentations read keeps a short side of
    at least `max_side` (``run`` sets twice the training crop) at a fraction of the memory; the
    feature pass and validation read exact pixels: ``get(path, exact=True)`` decodes such a file again.
    Validation is the eval transform, which is deterministic: `view` keeps its uint8 output per file,
    filled by the feature pass and read by every fine-tuning epoch, so a huge val photo is not decoded
    and resized again each epoch (measured: that was two thirds of a fine-tuning epoch on 12-MP photos).
    Past `max_bytes` (images and views together) new entries are computed as before and not kept.
    Safe to share between the threads of ``data.threaded`` (decoding runs outside the lock).
    """

    def __init__(self, max_side: int, max_bytes: int = 2 << 30) -> None:
        self.max_side, self.max_bytes = max_side, max_bytes
        self.images: dict[str, Image.Image] = {}
        self.views: dict[tuple[str, str], torch.Tensor] = {}
        self.downscaled: set[str] = set()
        self.nbytes = 0
        self.hits = self.misses = 0
        self._full_reported = False
        self._lock = threading.Lock()

    def _fits(self, size: int) -> bool:
        if self.nbytes + size <= self.max_bytes:
            self.nbytes += size
            return True
        if not self._full_reported:
            self._full_reported = True
            logger.info("decoded-image cache full at %.0f MB; further images are decoded each epoch",
                        self.nbytes / 2**20)
        return False

    def get(self, path, exact: bool = False, keep: bool = True) -> Image.Image:
        """The image (exact: the file's own pixels); `keep=False` reads without storing a new image."""
        key = str(path)
        with self._lock:
            image = self.images.get(key)
            if image is not None and not (exact and key in self.downscaled):
                self.hits += 1
                return image
            self.misses += 1
        decoded = image = load_image(path)
        if not keep or (exact and key in self.images):  # an exact re-read of a reduced image
            return decoded
        reduced = min(image.size) >= 2 * self.max_side
        if reduced:
            image = image.reduce(min(image.size) // self.max_side)
        with self._lock:
            if key in self.images:  # kept meanwhile (by another thread, or an earlier exact read)
                return decoded if exact else self.images[key]
            if reduced:
                self.downscaled.add(key)
            if self._fits(image.width * image.height * 3):
                self.images[key] = image
        return decoded if exact else image

    def prefill(self, images: Sequence[Path | str], views: Sequence[Path | str], view: EvalView, threads: int) -> int:
        """Decode `images` (kept as `get` keeps them) and compute `view` of `views`, on threads, skipping
        what is kept already; returns how many files it read. For fine-tuning whose features came from
        the disk cache: the feature pass decoded nothing then, and the first epoch would decode every
        file in line with training (measured on 12-MP photos: a 45.9 s first epoch, 10.0 s the second)."""

        def image(path) -> bool:
            if str(path) in self.images or self._full_reported:
                return False
            with contextlib.suppress(ImageError):  # reported by the dataset that reads it
                self.get(path)
            return True

        def pixels(path) -> bool:
            if (str(path), view[0]) in self.views or self._full_reported:
                return False
            with contextlib.suppress(ImageError):
                self._view_pixels(path, view)
            return True

        with ThreadPoolExecutor(threads, thread_name_prefix="transferlab-prefill") as pool:
            return sum(itertools.chain(pool.map(image, images), pool.map(pixels, views)))

    def view(self, path, view: EvalView) -> torch.Tensor:
        """The model input of ``view`` (:func:`~transferlab.data.transforms.eval_view`) for the file: its
        uint8 pixels are computed once and kept; the decoded image itself is not kept for them."""
        _, _, to_input = view
        return to_input(self._view_pixels(path, view))

    def _view_pixels(self, path, view: EvalView) -> torch.Tensor:
        """The kept uint8 pixels of ``view`` for the file (computed and kept on first use)."""
        key, pixels, _ = view
        slot = (str(path), key)
        kept = self.views.get(slot)
        if kept is None:
            kept = pixels(self.get(path, exact=True, keep=False))
            with self._lock:
                if slot not in self.views and self._fits(kept.numel() * kept.element_size()):
                    self.views[slot] = kept
        return kept


def label_targets(samples: Sequence[Sample], num_classes: int, multilabel: bool) -> torch.Tensor:
    """What the loss compares the logits with: class indices (N,) for single-label samples, multi-hot
    float vectors (N, num_classes) for multi-label ones (``training/objective.py`` tells them apart so)."""
    if not multilabel:
        return torch.tensor([s.label for s in samples], dtype=torch.long)
    targets = torch.zeros(len(samples), num_classes)
    for i, sample in enumerate(samples):
        targets[i, list(sample.label_set)] = 1.0
    return targets


class ImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """``(tensor, label)`` pairs from :class:`Sample` lists, decoded with :func:`load_image`.

    Files were validated when the splits were loaded, but a file can still change or vanish
    during a long run (network drives, a user cleaning the folder). Losing hours of training
    to one file is worse than one black image, so an unreadable file is logged once and
    replaced by a black image passed through the same transform (hence the right size).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable[[Image.Image], torch.Tensor],
        decoded: DecodedImages | None = None,
        exact_pixels: bool = False,
        kept_view: EvalView | None = None,
        targets: torch.Tensor | None = None,
    ) -> None:
        """`targets`: what each sample yields as its label (multi-hot rows for multi-label data; default
        the sample's class index). `kept_view`: :func:`~transferlab.data.transforms.eval_view` of the preprocessing `transform` is the
        eval transform of; its uint8 pixels are kept in `decoded` (:meth:`DecodedImages.view`) and reused."""
        self.samples = list(samples)
        self.transform = transform
        self.decoded, self.exact_pixels = decoded, exact_pixels
        self.kept_view = kept_view if decoded is not None else None
        self._reported: set[str] = set()
        self._targets = targets

    @property
    def labels(self) -> list[int]:
        """Label of every sample, in order (for class weights and balanced samplers)."""
        return [sample.label for sample in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int | torch.Tensor]:
        sample = self.samples[index]
        target = sample.label if self._targets is None else self._targets[index]
        if self.kept_view is not None:
            try:
                return self.decoded.view(sample.path, self.kept_view), target
            except ImageError:
                pass  # reported, and replaced by a black image, below
        try:
            image = self.decoded.get(sample.path, self.exact_pixels) if self.decoded is not None else load_image(sample.path)
        except ImageError as exc:
            self._report(sample.path, "Image became unreadable after validation", exc.reason)
            image = Image.new("RGB", (_FALLBACK_SIZE, _FALLBACK_SIZE))
        try:
            return self.transform(image), target
        except ImageError as exc:  # a resize bomb, refused by the transform before resizing
            self._report(sample.path, "Image cannot be resized", exc.reason)
            return self.transform(Image.new("RGB", (_FALLBACK_SIZE, _FALLBACK_SIZE))), target

    def _report(self, path: Path, what: str, reason: str) -> None:
        if str(path) not in self._reported:
            self._reported.add(str(path))
            logger.warning("%s, using a black image instead: %s (%s)", what, path, reason)
