"""Progressive resizing (fastai): fine-tune on small images first, the model's own size last.

Early epochs only need coarse gradients; at half the side an image costs about a quarter of the
compute. The last epoch always runs at full size, and validation always does, so the metrics and
the saved model are those of the real input size.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L

SIZE_STEP = 32  # sizes stay multiples of 32: every stride of the usual backbones divides them


def progressive_sizes(final: int, epochs: int, start_fraction: float) -> list[int]:
    """Per-epoch image sides, rising linearly from `start_fraction * final` to `final`."""
    if epochs <= 1 or start_fraction >= 1.0:
        return [final] * max(epochs, 0)
    first = start_fraction * final
    sizes = []
    for e in range(epochs):
        side = first + (final - first) * e / (epochs - 1)
        sizes.append(min(final, max(SIZE_STEP, round(side / SIZE_STEP) * SIZE_STEP)))
    sizes[-1] = final
    return sizes


class ProgressiveResize(L.Callback):
    """Sets the train dataset's transform for each epoch's size (absolute epochs: resume-safe)."""

    def __init__(self, dataset, make_transform: Callable[[int], Callable], sizes: list[int], start_epoch: int) -> None:
        self.dataset, self.make_transform, self.sizes, self.start_epoch = dataset, make_transform, sizes, start_epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        epoch = self.start_epoch + trainer.current_epoch  # 0-based over the whole fine-tuning
        self.dataset.transform = self.make_transform(self.sizes[min(epoch, len(self.sizes) - 1)])
