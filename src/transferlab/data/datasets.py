"""Torch dataset over validated samples."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from transferlab.data.images import ImageError, load_image
from transferlab.data.sources import Sample

__all__ = ["DecodedImages", "ImageDataset"]

logger = logging.getLogger("transferlab")

_FALLBACK_SIZE = 256


class DecodedImages:
    """Decoded images kept in memory (uint8 RGB), so a file is decoded once per run, not once per epoch.

    Fine-tuning re-reads every train and val image each epoch; decoding a JPEG costs about as much
    as the augmentations applied to it. Images whose short side exceeds `max_side` are stored
    downscaled to it (phone photos would otherwise cost 36 MB each); the default, 4x the model's
    input, is far above what any crop in the augmentation presets reads, so only huge images are
    resampled at all; `get(path, exact=True)` decodes those again, so features computed through the
    cache are bit-identical to uncached ones. Past `max_bytes` new images are decoded as before
    and not kept.
    """

    def __init__(self, max_side: int, max_bytes: int = 2 << 30) -> None:
        self.max_side, self.max_bytes = max_side, max_bytes
        self.images: dict[str, Image.Image] = {}
        self.downscaled: set[str] = set()
        self.nbytes = 0
        self.hits = self.misses = 0
        self._full_reported = False

    def get(self, path, exact: bool = False) -> Image.Image:
        key = str(path)
        image = self.images.get(key)
        if image is not None and not (exact and key in self.downscaled):
            self.hits += 1
            return image
        self.misses += 1
        decoded = image = load_image(path)
        if key in self.images:
            return decoded
        if min(image.size) > self.max_side:
            scale = self.max_side / min(image.size)
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.Resampling.LANCZOS)
            self.downscaled.add(key)
        size = image.width * image.height * 3
        if self.nbytes + size <= self.max_bytes:
            self.images[key] = image
            self.nbytes += size
        elif not self._full_reported:
            self._full_reported = True
            logger.info("decoded-image cache full at %.0f MB; further images are decoded each epoch",
                        self.nbytes / 2**20)
        return decoded if exact else image


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
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.decoded, self.exact_pixels = decoded, exact_pixels
        self._reported: set[str] = set()

    @property
    def labels(self) -> list[int]:
        """Label of every sample, in order (for class weights and balanced samplers)."""
        return [sample.label for sample in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        try:
            image = self.decoded.get(sample.path, self.exact_pixels) if self.decoded is not None else load_image(sample.path)
        except ImageError as exc:
            if str(sample.path) not in self._reported:
                self._reported.add(str(sample.path))
                logger.warning(
                    "Image became unreadable after validation, using a black image instead: "
                    "%s (%s)",
                    sample.path,
                    exc.reason,
                )
            image = Image.new("RGB", (_FALLBACK_SIZE, _FALLBACK_SIZE))
        return self.transform(image), sample.label
