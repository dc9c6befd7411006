"""`--time-budget`: plan the fine-tuning epochs to fit the time left, and never start one that cannot end.

The plan comes before fine-tuning starts (the one-cycle schedule needs its length up front), from the
frozen stage's measured forward throughput; the stop rule then uses each finished epoch's real
duration, so a wrong estimate costs at most an unannealed schedule, never an overrun.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import lightning as L

log = logging.getLogger("transferlab")

# A training step (forward + backward + update) costs about 3 forwards at the same precision.
TRAIN_STEP_FORWARDS = 3.0
# Training in fp32 while features were extracted in bf16 (CPUs with native bf16): measured on
# Lite0 at 224 px on this project's 2-core Xeon, fp32 forward 62 img/s vs bf16 105 img/s.
FP32_OVER_BF16 = 1.7


def estimate_epoch_seconds(n_train: int, n_val: int, forward_images_per_second: float, *,
                           extract_precision: str, training_precision: str) -> float:
    """Seconds for one fine-tuning epoch (train + val), from the frozen-forward throughput."""
    penalty = FP32_OVER_BF16 if training_precision.startswith("32") and "bf16" in extract_precision else 1.0
    forward_s = penalty / forward_images_per_second
    return n_train * TRAIN_STEP_FORWARDS * forward_s + n_val * forward_s


def plan_finetune_epochs(requested: int, seconds_left: float, epoch_seconds: float | None) -> int:
    """As many of the `requested` epochs as fit in `seconds_left` (all of them when unknown)."""
    if epoch_seconds is None or epoch_seconds <= 0:
        return requested
    return max(0, min(requested, int(seconds_left // epoch_seconds)))


class TimeBudgetStop(L.Callback):
    """Stops fine-tuning after an epoch when another one, as long as the last, would pass the deadline."""

    def __init__(self, deadline: float, clock: Callable[[], float] = time.perf_counter) -> None:
        self.deadline, self.clock = deadline, clock  # deadline on `clock`'s scale
        self.epoch_start = 0.0
        self.stopped = False

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.epoch_start = self.clock()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        now = self.clock()
        if now + (now - self.epoch_start) > self.deadline and not trainer.should_stop:
            self.stopped = True
            trainer.should_stop = True
            log.info("time budget: stopping after this epoch (another would end %.0fs past the budget)",
                     now + (now - self.epoch_start) - self.deadline)
