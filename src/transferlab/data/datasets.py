"""Torch dataset over validated samples."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from transferlab.data.images import ImageError, load_image
from transferlab.data.sources import Sample

__all__ = ["ImageDataset"]

logger = logging.getLogger("transferlab")

_FALLBACK_SIZE = 256


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
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
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
            image = load_image(sample.path)
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
