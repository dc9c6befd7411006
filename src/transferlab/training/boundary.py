"""Partial fine-tuning on a boundary cache: the top stages trained on cached activations of the frozen bottom.

A backbone whose forward is a chain (stem → stages → tail → head) is cut before its last `stages`
stages. The bottom — the early, high-resolution stages that cost most of every forward and backward
pass — runs once per cached view, in the features' precision, with BatchNorm folded; the top then
trains for several epochs on those activations, so an epoch costs only the top's forward and
backward. The top trains on the activations of the plain train images at the evaluation size (kept
from the feature pass), the scale the head was fitted and the model is validated at (fine-tuning at
smaller random crops started below the head on every suite dataset); `--boundary-views N` adds N
augmented views, one more bottom pass over train each, which raised no suite dataset's val accuracy. Measured per
dataset in bench/RESULTS.md.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader

from transferlab.models.heads import HeadSlot
from transferlab.training import objective
from transferlab.training.finetune import TrainingDiverged, build_scheduler
from transferlab.training.head_stage import selection_score
from transferlab.training.lr_find import LRFindResult, lr_range_test

log = logging.getLogger("transferlab")

# Activations kept in memory for all views together; over it, fewer views are cached (or, when not
# even one fits beside the val split, fine-tuning falls back to the full loop).
CACHE_BUDGET_BYTES = 4 * 2**30
STORAGE_DTYPE = torch.bfloat16  # halves the cache; the top trains in fp32 on the upcast values


UNDERFIT_RATIO = 0.5


def head_underfits(train_accuracy: float, val_accuracy: float) -> bool:
    """Whether the frozen head's val error is largely bias: its train error is at least UNDERFIT_RATIO of
    its val error. A head that fits its training images far better than val errs from variance, which
    adapting the features (more capacity) does not cure; one that cannot fit them lacks features that
    separate the classes, which fine-tuning gives. On the suite (bench/RESULTS.md) the ratio was 0.67-1.07
    where fine-tuning added 1-11 points and 0.19-0.31 where it added none."""
    val_error = 1.0 - val_accuracy
    return val_error > 0 and (1.0 - train_accuracy) >= UNDERFIT_RATIO * val_error


@dataclass
class Chain:
    """A model's forward as a chain: ``stem``, then ``stages`` in order, then ``tail`` (pooling, head)."""

    stem: list[nn.Module]
    stages: list[nn.Module]
    tail: list[nn.Module]


def _timm_efficientnet(model: nn.Module) -> Chain | None:
    names = ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool", "classifier")
    if not all(hasattr(model, n) for n in names) or not isinstance(model.blocks, nn.Sequential):
        return None
    return Chain([model.conv_stem, model.bn1], list(model.blocks),
                 [model.conv_head, model.bn2, model.global_pool, nn.Flatten(1), model.classifier])


def _resnet(model: nn.Module) -> Chain | None:
    stages = [getattr(model, f"layer{i}", None) for i in range(1, 5)]
    if any(s is None for s in stages):
        return None
    if all(hasattr(model, n) for n in ("conv1", "bn1", "act1", "maxpool", "global_pool", "fc")):  # timm
        return Chain([model.conv1, model.bn1, model.act1, model.maxpool], stages,
                     [model.global_pool, nn.Flatten(1), model.fc])
    if all(hasattr(model, n) for n in ("conv1", "bn1", "relu", "maxpool", "avgpool", "fc")):  # torchvision
        return Chain([model.conv1, model.bn1, model.relu, model.maxpool], stages,
                     [model.avgpool, nn.Flatten(1), model.fc])
    return None


CHAINS: dict[str, Callable[[nn.Module], Chain | None]] = {
    "timm-efficientnet": _timm_efficientnet,  # EfficientNet(-Lite), MobileNet-V2/V3 and their kin in timm
    "resnet": _resnet,  # timm and torchvision ResNets
}
"""Architectures whose forward is a plain chain, by name; each returns None for other models."""


@dataclass
class BoundarySplit:
    bottom: nn.Module  # images -> boundary activations (stays frozen)
    top: nn.Module  # boundary activations -> logits (trained)
    cut: int  # index of the first trained stage


def split_model(model: nn.Module, stages: int, probe_size: int = 64) -> BoundarySplit | None:
    """`model` cut before its last `stages` stages, sharing its modules (training the top trains the
    model); None when no chain fits or the chain's output differs from the model's on a probe image."""
    for name, chain_of in CHAINS.items():
        chain = chain_of(model)
        if chain is None:
            continue
        if not isinstance(chain.tail[-1], HeadSlot) or not 1 <= stages <= len(chain.stages):
            return None
        cut = len(chain.stages) - stages
        split = BoundarySplit(nn.Sequential(*chain.stem, *chain.stages[:cut]),
                              nn.Sequential(*chain.stages[cut:], *chain.tail), cut)
        if _same_output(model, split, probe_size):
            return split
        log.info("fine-tuning: the %s chain does not reproduce this model's output; no boundary split", name)
        return None
    return None


@torch.no_grad()
def _same_output(model: nn.Module, split: BoundarySplit, size: int) -> bool:
    was_training = model.training
    model.eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    try:
        return torch.allclose(model(x), split.top(split.bottom(x)), rtol=1e-4, atol=1e-5)
    except (RuntimeError, ValueError):
        return False
    finally:
        model.train(was_training)


@torch.no_grad()
def activation_shape(bottom: nn.Module, size: int) -> torch.Size:
    was_training = bottom.training
    bottom.eval()
    try:
        return bottom(torch.zeros(1, 3, size, size)).shape[1:]
    finally:
        bottom.train(was_training)


def views_that_fit(requested: int, n_train: int, n_val: int, per_image_bytes: int,
                   budget: int | None = None) -> int | None:
    """How many augmented train views fit in the cache budget beside the activations of val and of the
    plain train view; None when not even those fit."""
    budget = CACHE_BUDGET_BYTES if budget is None else budget
    room = budget - (n_val + n_train) * per_image_bytes
    if room < 0:
        return None
    return min(requested, room // max(1, n_train * per_image_bytes))


@torch.no_grad()
def cache_activations(bottom: nn.Module, dataset, *, batch_size: int, autocast: torch.dtype | None,
                      num_workers: int = 0, progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """The bottom's activations of every item of `dataset`, in order, stored in STORAGE_DTYPE."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    out = []
    for x, _y in loader:
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext():
            out.append(bottom(x).to(STORAGE_DTYPE))
        if progress is not None:
            progress(len(x))
    return torch.cat(out)


@torch.no_grad()
def evaluate_top(top: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast: torch.dtype | None,
                 batch_size: int = 128) -> tuple[float, float]:
    """(mean loss, score) of the top on cached activations (training/objective.py: cross-entropy and
    accuracy, or multi-label BCE and mAP)."""
    top.eval()
    loss, tally = 0.0, objective.Tally()
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size].float().contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext():
            logits = top(xb).float()
        loss += objective.loss(logits, y[i : i + batch_size], reduction="sum").item()
        tally.add(logits, y[i : i + batch_size])
    return loss / max(1, len(x)), tally.value() if len(x) else 0.0


def forward_images_per_second(top: nn.Module, x: torch.Tensor, autocast: torch.dtype | None,
                              batch_size: int = 32) -> float:
    """The top's forward throughput on cached activations, timed on a second batch (the first one
    allocates), for --time-budget's epoch estimate."""
    top.eval()
    batches = [x[i : i + batch_size] for i in range(0, min(len(x), 2 * batch_size), batch_size)]
    seconds = 0.0
    with torch.no_grad():
        for xb in batches:
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext():
                top(xb.float().contiguous(memory_format=torch.channels_last))
            seconds = time.perf_counter() - start
    return len(batches[-1]) / max(seconds, 1e-9)


def _keep_frozen_modes(top: nn.Module) -> None:
    """BatchNorm keeps its pretrained statistics (as the full loop's 'eval' policy): batches of one
    dataset's views would otherwise replace ImageNet's statistics in a few steps."""
    for m in top.modules():
        if isinstance(m, _BatchNorm):
            m.eval()


def _top_optimizer(top: nn.Module, lr: float, head_lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the whole top: the body's stages at `lr` (group 0), the head at `head_lr` (group 1)."""
    head_ids = {id(p) for m in top.modules() if isinstance(m, HeadSlot) for p in m.parameters()}
    body = [p for p in top.parameters() if id(p) not in head_ids]
    head = [p for p in top.parameters() if id(p) in head_ids]
    for p in top.parameters():
        p.requires_grad_(True)
    return torch.optim.AdamW([{"params": body, "lr": lr}, {"params": head, "lr": head_lr}],
                             weight_decay=weight_decay)


def range_test_top(
    top: nn.Module,
    views: Sequence[torch.Tensor],
    train_y: torch.Tensor,
    *,
    head_lr_multiplier: float,
    weight_decay: float,
    label_smoothing: float,
    batch_size: int,
    seed: int,
    num_steps: int,
    method: str = "valley",
    start_lr: float = 1e-7,
    end_lr: float = 1.0,
) -> LRFindResult:
    """An LR range test (training/lr_find.py) of the top as `train_top` trains it: AdamW with the head at
    `head_lr_multiplier` × the body's LR, label smoothing, BatchNorm frozen, each step a batch of random
    images in random views. Seeded by `seed` alone; the top (weights, requires_grad, modes) is left as
    it was. The suggestion is the body's LR, what `train_top` takes as `lr`."""
    flags = [p.requires_grad for p in top.parameters()]
    optimizer = _top_optimizer(top, start_lr, start_lr * head_lr_multiplier, weight_decay)
    generator = torch.Generator().manual_seed(seed * 1000 + 17)
    n = len(train_y)
    modes = [(m, m.training) for m in top.modules()]
    top.train()
    _keep_frozen_modes(top)  # lr_range_test keeps a model already in train mode as it is

    def step() -> torch.Tensor:
        idx = torch.randint(n, (min(batch_size, n),), generator=generator)
        view_of = torch.randint(len(views), (len(idx),), generator=generator)
        x = torch.stack([views[v][i] for i, v in zip(idx.tolist(), view_of.tolist())]).float()
        return objective.loss(top(x), train_y[idx], label_smoothing)

    try:
        with torch.random.fork_rng(devices=[]):  # the caller's RNG stream goes on as if the test had not run
            torch.manual_seed(seed)  # dropout draws
            return lr_range_test(top, optimizer, step, start_lr=start_lr, end_lr=end_lr, num_steps=num_steps,
                                 method=method)
    finally:
        for p, flag in zip(top.parameters(), flags):
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


def train_top(
    top: nn.Module,
    views: Sequence[torch.Tensor],
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    head_lr: float,
    weight_decay: float,
    label_smoothing: float,
    batch_size: int,
    seed: int,
    baseline: tuple[float, float],
    gate_epochs: int = 0,
    patience: int = 0,
    autocast: torch.dtype | None = None,
    deadline: float | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> tuple[list[dict], dict[str, torch.Tensor] | None, str | None]:
    """One-cycle AdamW on the top (head at `head_lr`), each epoch reading one random view per image.
    Returns the epoch records, the best top state when an epoch beat `baseline` (the frozen head's
    `selection_score`), else None, and why it stopped early (None, 'gate', 'early stop' or 'time budget').
    `patience` > 0: once an epoch has beaten the baseline, stop after that many epochs in a row that
    neither became the best nor lowered the val loss of the epoch before — epochs after the best are
    thrown away, and a rising loss on tied accuracy is where they start (0: every epoch runs)."""
    optimizer = _top_optimizer(top, lr, head_lr, weight_decay)
    n = len(train_y)
    steps = max(1, math.ceil(n / batch_size)) * epochs
    scheduler = build_scheduler("onecycle", optimizer, steps, pct_start=0.25)
    generator = torch.Generator().manual_seed(seed)
    # Dropout draws from torch's global stream, which whatever ran before consumed unevenly (each DataLoader
    # of a boundary pass takes a seed from it; activations taken from the feature pass do not): seeded
    # here, a seed gives the same stage whether the activations were cached, taken or recomputed.
    torch.manual_seed(seed)
    top.to(memory_format=torch.channels_last)
    records: list[dict] = []
    best, best_state, stopped = baseline, None, None
    stale = 0  # epochs in a row, since one beat the baseline, with neither a new best nor a lower val loss
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        top.train()
        _keep_frozen_modes(top)
        order = torch.randperm(n, generator=generator)
        view_of = torch.randint(len(views), (n,), generator=generator)
        total, tally = 0.0, objective.Tally()
        for idx in order.split(batch_size):
            x = torch.stack([views[v][i] for i, v in zip(idx.tolist(), view_of[idx].tolist())])
            x = x.float().contiguous(memory_format=torch.channels_last)
            logits = top(x)
            loss = objective.loss(logits, train_y[idx], label_smoothing)
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"Training diverged: the loss became {loss.item()} in fine-tuning epoch "
                                       f"{epoch}. The frozen stage's model is kept; train again with a lower "
                                       "--lr-finetune.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(idx)
            tally.add(logits, train_y[idx])
        val_loss, val_acc = evaluate_top(top, val_x, val_y, autocast)
        record = {"epoch": epoch, "train_loss": total / n, "train_accuracy": tally.value(), "val_loss": val_loss,
                  "val_accuracy": val_acc, "lr": max(g["lr"] for g in optimizer.param_groups),
                  "epoch_seconds": time.perf_counter() - start}
        records.append(record)
        improved = selection_score(val_acc, val_loss) > best
        if improved:
            best = selection_score(val_acc, val_loss)
            best_state = copy.deepcopy(top.state_dict())
        if on_epoch is not None:
            on_epoch(record, improved)
        if gate_epochs and epoch == gate_epochs and best_state is None and epoch < epochs:
            stopped = "gate"
            break
        if best_state is not None and not improved:
            stale = stale + 1 if len(records) > 1 and val_loss >= records[-2]["val_loss"] else 0
        else:
            stale = 0
        if patience and stale >= patience and epoch < epochs:
            stopped = "early stop"
            break
        if deadline is not None and epoch < epochs and time.perf_counter() + record["epoch_seconds"] > deadline:
            stopped = "time budget"
            break
    return records, best_state, stopped
