"""Fine-tuning has to earn its time: it stops when it has not beaten the frozen stage it started from.

Measured: on ants vs bees (ImageNet-like) the head on frozen Lite0 features reaches val loss 0.178;
the four fine-tuning epochs after it gave 0.192, 0.224, 0.215, 0.210 and never a better accuracy,
for 44 s of a 52 s run. On the digits demo (far from ImageNet) fine-tuning is worth 0.90 -> 0.99, but
its first epoch, which ends near the one-cycle schedule's peak LR, can still be worse than the head:
with torch 2.14 it was at seeds 0, 1 and 2 (val loss 0.444 vs 0.406, 0.432 vs 0.400, 0.562 vs 0.446),
while the second epoch beat it every time (0.167, 0.209, 0.177). So the default gate judges after two
epochs; the best model (the frozen stage's, if it stays best) is kept either way.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import lightning as L

log = logging.getLogger("transferlab")


def beat_frozen_stage(val_losses: Sequence[float], baseline: float) -> bool:
    """Did any of these fine-tuning epochs end with a lower val loss than the frozen stage's?"""
    return any(v < baseline for v in val_losses)


class FrozenStageGate(L.Callback):
    """Stops fine-tuning after its epoch `epochs` unless one of the epochs so far beat `baseline`, the
    val loss of the frozen-stage model it started from. `losses`: those of the fine-tuning epochs
    already done (a resumed run), so the epoch count is the number of losses seen.
    Metrics are summed over ranks before this runs, so every process decides the same."""

    def __init__(self, baseline: float, epochs: int, losses: Sequence[float] = ()) -> None:
        self.baseline, self.epochs = baseline, epochs
        self.losses = list(losses)
        self.stopped = False

    def closed(self) -> bool:
        """The gate's epoch is done and none of the epochs up to it beat the frozen stage."""
        return len(self.losses) >= self.epochs and not beat_frozen_stage(self.losses[: self.epochs], self.baseline)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.losses.append(pl_module.epoch_metrics()["val_loss"])
        if len(self.losses) == self.epochs and self.closed() and not trainer.should_stop:
            self.stopped = True
            trainer.should_stop = True
            log.info("fine-tuning did not beat the frozen stage in %d epoch(s) (val loss %.4f vs %.4f): stopping; "
                     "the best model so far is kept (--finetune-gate 0 runs every epoch)",
                     self.epochs, min(self.losses), self.baseline)
