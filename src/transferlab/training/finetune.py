"""Fine-tuning stage on Lightning: the whole network (or its top blocks) with discriminative LRs.

Lightning gives progress bars, precision (bf16 autocast on CPUs/GPUs that have it), devices and
DDP/multi-node for free; the run-directory bookkeeping (metrics rows, safetensors checkpoints,
best model) lives in a callback owned by the caller.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from transferlab._testing import pause_point
from transferlab.errors import TransferlabError
from transferlab.training import objective
from transferlab.training.memory import AdaptiveBatch, activation_budget


def _hits(logits: torch.Tensor, targets: torch.Tensor) -> int:
    """Correct top-1 predictions (single-label; a multi-label batch scores by mAP at the epoch's end)."""
    return 0 if objective.is_multilabel(targets) else int((logits.argmax(1) == targets).sum())


class TrainingDiverged(TransferlabError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


def build_optimizer(name: str, param_groups: list[dict], weight_decay: float) -> torch.optim.Optimizer:
    factories = {
        "adamw": lambda: torch.optim.AdamW(param_groups, weight_decay=weight_decay),
        "adam": lambda: torch.optim.Adam(param_groups),
        "sgd": lambda: torch.optim.SGD(param_groups, momentum=0.9, nesterov=True, weight_decay=weight_decay),
    }
    return factories[name]()


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, total_steps: int, pct_start: float = 0.3):
    """Per-step schedule. One-cycle warms up for `pct_start` then anneals: fewer, better epochs. Under
    two warm-up steps there is no cycle to speak of (and torch's one-cycle divides by zero when its
    warm-up ends on step 0): constant."""
    total_steps = max(1, total_steps)
    if name == "onecycle" and pct_start * total_steps < 2:
        name = "constant"
    factories = {
        "onecycle": lambda: torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[g["lr"] for g in optimizer.param_groups],
            total_steps=total_steps,
            pct_start=pct_start,
            div_factor=10.0,
            final_div_factor=100.0,
            cycle_momentum=False,
        ),
        "cosine": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps),
        "constant": lambda: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
    }
    return factories[name]()


class FineTuneModule(L.LightningModule):
    """Classifier training (cross-entropy, or multi-label BCE: training/objective.py) with a BatchNorm
    policy and frozen-block handling."""

    def __init__(
        self,
        model: nn.Module,
        param_groups: list[dict],
        *,
        optimizer: str = "adamw",
        weight_decay: float = 0.0,
        schedule: str = "onecycle",
        total_steps: int = 1,
        label_smoothing: float = 0.0,
        bn_mode: str = "eval",
        restore: dict[str, Any] | None = None,
        max_memory: int | None = None,
        val_autocast: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        # Manual optimization: a batch that runs out of memory is redone in halves whose gradients
        # add up before the one optimizer step (training/memory.py); Lightning's automatic loop
        # would zero the gradients of all but the last half.
        self.automatic_optimization = False
        self.max_memory = max_memory
        self.train_passes = AdaptiveBatch("fine-tuning", min_size=2 if bn_mode == "train" else 1)
        self.val_passes = AdaptiveBatch("validation")
        self.model = model
        self._param_groups = param_groups
        self.optimizer_name = optimizer
        self.weight_decay = weight_decay
        self.schedule = schedule
        self.total_steps = total_steps
        self.label_smoothing = label_smoothing
        self.bn_mode = bn_mode
        self.restore = restore or {}
        # Validation has no backward, so it can run in the precision the frozen features were
        # extracted in (bf16 on CPUs with native bf16) while the training steps stay fp32, whose
        # depthwise backward is slow in bf16: Lite0 at 288 px, 153 images, 3.8-4.8 s -> 2.2-2.4 s.
        self.val_autocast = val_autocast
        trainable = {id(p) for g in param_groups for p in g["params"]}
        # Modules whose parameters are all frozen stay in eval mode (dropout off, BN statistics fixed).
        self._frozen_modules = [
            m for m in model.modules()
            if any(True for _ in m.parameters(recurse=False))
            and not any(id(p) in trainable for p in m.parameters(recurse=False))
        ]
        self.reset_epoch_stats()

    def reset_epoch_stats(self) -> None:
        self.stats = {"train_loss": 0.0, "train_correct": 0, "train_n": 0,
                      "val_loss": 0.0, "val_correct": 0, "val_n": 0}
        # multi-label scores (mAP) need the epoch's outputs, not counted hits; single-label ones stay in stats
        self.tallies = {"train": objective.Tally(), "val": objective.Tally()}

    def on_validation_epoch_start(self) -> None:
        self.tallies["val"] = objective.Tally()

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            self.apply_mode_policy()
        return self

    def apply_mode_policy(self) -> None:
        """Frozen modules and (policy 'eval') BatchNorm layers stay in eval mode while training.
        Lightning restores per-module modes around validation rather than calling train(), so
        this also runs at the start of every training epoch."""
        for m in self._frozen_modules:
            m.eval()
        if self.bn_mode == "eval":
            for m in self.model.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()

    def on_train_epoch_start(self) -> None:
        self.model.train()
        self.apply_mode_policy()

    def on_fit_start(self) -> None:
        # channels-last: measured 23 vs 15 img/s for a Lite0 training step on CPU (fp32)
        self.model.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def training_step(self, batch, batch_idx):
        pause_point("finetune_step")
        x, y = batch
        n = len(y)
        optimizer = self.optimizers()
        totals = {"loss": 0.0, "correct": 0}

        outputs: list[tuple[torch.Tensor, torch.Tensor]] = []

        def reset() -> None:
            optimizer.zero_grad()
            totals.update(loss=0.0, correct=0)
            outputs.clear()

        def step(start: int, stop: int) -> None:
            logits = self(x[start:stop])
            loss = objective.loss(logits.float(), y[start:stop], self.label_smoothing)
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"Training diverged: the loss became {loss.item()} at batch {batch_idx}.")
            # each part weighs its share of the batch: the summed gradient is the whole batch's.
            # Under DDP only the last part syncs gradients, so every rank syncs once per step
            # however many parts its own out-of-memory errors made.
            sync = stop == n or not hasattr(self.trainer.strategy, "block_backward_sync")
            with contextlib.nullcontext() if sync else self.trainer.strategy.block_backward_sync():
                self.manual_backward(loss if stop - start == n else loss * ((stop - start) / n))
            totals["loss"] += loss.detach().item() * (stop - start)
            totals["correct"] += _hits(logits, y[start:stop])
            outputs.append((logits.detach(), y[start:stop]))

        reset()
        with activation_budget(self.model, self.max_memory):
            self.train_passes.run(n, step, reset)
        optimizer.step()
        self.lr_schedulers().step()
        for logits, targets in outputs:
            self.tallies["train"].add(logits, targets)
        self.stats["train_loss"] += totals["loss"]
        self.stats["train_correct"] += totals["correct"]
        self.stats["train_n"] += n
        self.log("train_loss", totals["loss"] / n, prog_bar=True, on_step=True, on_epoch=False, batch_size=n)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        totals = {"loss": 0.0, "correct": 0}

        def step(start: int, stop: int) -> None:
            with (torch.autocast(x.device.type, dtype=self.val_autocast) if self.val_autocast is not None
                  else contextlib.nullcontext()):
                logits = self(x[start:stop]).float()
            totals["loss"] += objective.loss(logits, y[start:stop], reduction="sum").item()
            totals["correct"] += _hits(logits, y[start:stop])
            outputs.append((logits, y[start:stop]))

        outputs: list[tuple[torch.Tensor, torch.Tensor]] = []

        def reset() -> None:
            totals.update(loss=0.0, correct=0)
            outputs.clear()

        with activation_budget(self.model, self.max_memory):
            self.val_passes.run(len(y), step, reset)
        for logits, targets in outputs:
            self.tallies["val"].add(logits, targets)
        self.stats["val_loss"] += totals["loss"]
        self.stats["val_correct"] += totals["correct"]
        self.stats["val_n"] += len(y)

    def on_validation_epoch_end(self) -> None:
        self._sum_stats_over_ranks()
        n = max(1, self.stats["val_n"])
        val_loss = self.stats["val_loss"] / n
        self.log("val_loss", val_loss if math.isfinite(val_loss) else 1e9, prog_bar=True, sync_dist=True)
        self.log("val_acc", self.stats["val_correct"] / n, prog_bar=True, sync_dist=True)

    def _sum_stats_over_ranks(self) -> None:
        """Each rank saw its shard of the epoch: add the sums up, so the metrics (and early
        stopping, and the best-model choice) are those of the whole train and val sets."""
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return
        keys = sorted(self.stats)
        totals = torch.tensor([float(self.stats[k]) for k in keys], dtype=torch.float64, device=self.device)
        totals = trainer.strategy.reduce(totals, reduce_op="sum")
        for k, v in zip(keys, totals.tolist()):
            self.stats[k] = v if k.endswith("loss") else round(v)

    def epoch_metrics(self) -> dict[str, float]:
        s = self.stats
        metrics = {
            "train_loss": s["train_loss"] / max(1, s["train_n"]),
            "train_accuracy": s["train_correct"] / max(1, s["train_n"]),
            "val_loss": s["val_loss"] / s["val_n"] if s["val_n"] else float("nan"),
            "val_accuracy": s["val_correct"] / s["val_n"] if s["val_n"] else float("nan"),
        }
        for split, tally in self.tallies.items():
            if tally.multilabel:
                metrics[f"{split}_accuracy"] = tally.value()
        return metrics

    def configure_optimizers(self):
        optimizer = build_optimizer(self.optimizer_name, self._param_groups, self.weight_decay)
        scheduler = build_scheduler(self.schedule, optimizer, self.total_steps)
        if "optimizer" in self.restore:
            optimizer.load_state_dict(self.restore["optimizer"])
        if "scheduler" in self.restore:
            scheduler.load_state_dict(self.restore["scheduler"])
        return {"optimizer": optimizer, "lr_scheduler": scheduler}  # stepped per batch in training_step
