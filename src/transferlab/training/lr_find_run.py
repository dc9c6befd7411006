"""`transferlab lr-find`: the LR range test (training/lr_find.py) of the stage `train` fine-tunes by default.

The data are read and checked as `train` reads them, the frozen features come from (or go into) the
same feature cache, and the head is fitted on them as `train` fits it; then the boundary activations of
the train images are cached and the top — the last --boundary-stages stages and the trained head — is
run through the range test as `train_top` trains it (AdamW, the head at HEAD_LR_MULTIPLIER × the body's
LR, label smoothing, BatchNorm frozen). From a trained head, the curve measures the stages below it,
not a random head learning the classes. The suggestion is the body's peak LR: `--lr-finetune`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from datetime import datetime
from pathlib import Path

import lightning as L
import torch

from transferlab import _runtime
from transferlab.config import TrainConfig
from transferlab.data.multilabel import refuse_multilabel
from transferlab.data.sources import load_splits, require_data
from transferlab.errors import TransferlabError
from transferlab.io import atomic_write_json, ensure_writable_dir
from transferlab.models.heads import HeadConfig, build_classifier
from transferlab.models.param_groups import freeze_backbone
from transferlab.models.registry import resolve_backbone
from transferlab.training import boundary, distributed
from transferlab.training.features import check_any_input_size, decoded_images, frozen_features, resolve_sizes
from transferlab.training.head_stage import selection_score
from transferlab.training.lr_find import SUGGESTIONS, LRFindResult, plot_lr_find
from transferlab.training.run import (
    HEAD_LR_MULTIPLIER,
    _boundary_plan,
    _boundary_tap,
    _cache_boundary,
    _fit_head,
)

log = logging.getLogger("transferlab")

MIN_STEPS = 10
"""The fewest steps worth running: the rules read the curve less its first tenth and its last 5 points."""

PLOT_NAME, JSON_NAME = "lr_find.png", "lr_find.json"


def check_options(num_steps: int, method: str, start_lr: float, end_lr: float) -> None:
    """The range test's own options, rejected before any work."""
    if method not in SUGGESTIONS:
        raise TransferlabError(f"--method '{method}' is not one of {', '.join(SUGGESTIONS)}.")
    if not isinstance(num_steps, int) or num_steps < MIN_STEPS:
        raise TransferlabError(f"--num-steps must be at least {MIN_STEPS} (the suggestion skips the curve's first "
                               f"tenth and last 5 points), got {num_steps}.")
    if not (math.isfinite(start_lr) and math.isfinite(end_lr) and 0 < start_lr < end_lr):
        raise TransferlabError(f"Need 0 < --start-lr < --end-lr, got {start_lr:g} and {end_lr:g}.")


def default_out_dir() -> Path:
    return Path("runs") / f"lr-find-{datetime.now():%Y%m%d-%H%M%S}"


def find_lr(cfg: TrainConfig, *, num_steps: int = 100, method: str = "valley", start_lr: float = 1e-7,
            end_lr: float = 1.0, out: str | Path | None = None) -> LRFindResult:
    """Run the range test on the boundary top `train` would fine-tune with `cfg`; write OUT/lr_find.png and
    OUT/lr_find.json. The result's `files` say where they went, `setup` what was tested."""
    check_options(num_steps, method, start_lr, end_lr)
    # what `train` fine-tunes by default, whatever `cfg` says of the schedule
    cfg = dataclasses.replace(cfg, strategy="two-stage", finetune="boundary",
                              epochs_finetune=max(1, cfg.epochs_finetune))
    cfg.validate()
    refuse_multilabel(cfg.data, "lr-find")
    if cfg.epochs_frozen < 1:
        raise TransferlabError("lr-find fits the head first (as train does): --epochs-frozen must be >= 1.")
    if cfg.world_size > 1:
        raise TransferlabError("lr-find runs in one process: leave --devices and --num-nodes at 1.")
    require_data(cfg.data)
    _runtime.setup_torch()
    t_start = time.perf_counter()
    spec = resolve_backbone(cfg.backbone, pretrained=cfg.pretrained, img_size=cfg.img_size)  # offline: fails here
    if cfg.preprocess:
        spec = dataclasses.replace(spec, preprocessing=dataclasses.replace(spec.preprocessing, **cfg.preprocess))
    spec, train_pre = resolve_sizes(cfg, spec)
    head_cfg = HeadConfig(kind=cfg.head, hidden=cfg.head_hidden, dropout=cfg.head_dropout)
    # the architecture must have a boundary to cut before the data are read (a two-class probe model)
    if boundary.split_model(build_classifier(spec, 2, head_cfg), cfg.boundary_stages) is None:
        raise TransferlabError(f"lr-find tests boundary fine-tuning, and {spec.name} has no boundary split at "
                               f"--boundary-stages {cfg.boundary_stages} (train would fine-tune the whole network "
                               "at its default --lr-finetune there).")
    out_dir = ensure_writable_dir(Path(out) if out is not None else default_out_dir())
    if cfg.num_workers is None:
        cfg.num_workers = _runtime.default_num_workers()
    accelerator = _runtime.resolve_accelerator(cfg.device)
    autocast = _runtime.autocast_dtype(_runtime.resolve_precision(cfg.precision, accelerator, training=False))
    ranks = distributed.Ranks(device=accelerator)

    splits = load_splits(cfg.data, val_split=cfg.val_split, seed=cfg.seed, progress=cfg.progress)
    for w in splits.warnings:
        log.warning(w)
    for s in splits.skipped:
        log.warning("skipped %s: %s", s["path"], s["reason"])
    log.info("data: %d train / %d val images, %d classes, %d skipped", len(splits.train), len(splits.val),
             len(splits.classes), len(splits.skipped))

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model = build_classifier(spec, len(splits.classes), head_cfg)
    if cfg.eval_size != cfg.img_size:
        check_any_input_size(model, cfg)
    plan = _boundary_plan(model, cfg, splits, ranks)
    if plan is None:
        raise TransferlabError(f"The boundary activations of {len(splits.train)} train images exceed the "
                               f"{boundary.CACHE_BUDGET_BYTES / 2**30:.0f} GiB cache: train fine-tunes the whole "
                               "network on this data, which lr-find does not test.")
    split, _per_image, views = plan
    decoded = decoded_images(cfg)
    freeze_backbone(model)
    tapped: dict[str, torch.Tensor] = {}
    features, _ = frozen_features(model, splits, cfg, spec, train_pre, ranks, autocast, decoded,
                            tap=_boundary_tap(model, cfg, splits, ranks, plan), tapped=tapped)
    records, _ = _fit_head(model, features, cfg)
    head = max(records, key=lambda r: selection_score(r["val_accuracy"], r["val_loss"]))
    log.info("head: val accuracy %.4f, train accuracy %.4f (epoch %d of %d)", head["val_accuracy"],
             head["train_accuracy"], head["epoch"], len(records))
    underfits = boundary.head_underfits(head["train_accuracy"], head["val_accuracy"])
    if cfg.finetune_when == "underfit" and not underfits:
        log.info("note: this head does not underfit, so train (--finetune-when underfit) would skip fine-tuning "
                 "on this data; the LR below applies with --finetune-when always")
    view_x, _, _ = _cache_boundary(split, splits, cfg, spec, views, decoded, autocast, tapped, with_val=False)
    train_y = torch.tensor([s.label for s in splits.train])
    t0 = time.perf_counter()
    result = boundary.range_test_top(split.top, view_x, train_y, head_lr_multiplier=HEAD_LR_MULTIPLIER,
                                     weight_decay=cfg.weight_decay, label_smoothing=cfg.label_smoothing,
                                     batch_size=cfg.batch_size, seed=cfg.seed, num_steps=num_steps, method=method,
                                     start_lr=start_lr, end_lr=end_lr)
    result.setup = {
        "data": str(cfg.data), "backbone": spec.name, "boundary_stages": cfg.boundary_stages, "views": views,
        "eval_size": cfg.eval_size, "batch_size": cfg.batch_size, "seed": cfg.seed, "num_steps": num_steps,
        "start_lr": start_lr, "end_lr": end_lr, "num_train": len(splits.train), "classes": len(splits.classes),
        "head_val_accuracy": head["val_accuracy"], "head_train_accuracy": head["train_accuracy"],
        "head_underfits": underfits, "head_lr_multiplier": HEAD_LR_MULTIPLIER,
        "head_lr": None if result.suggestion is None else result.suggestion * HEAD_LR_MULTIPLIER,
        "test_seconds": round(time.perf_counter() - t0, 3), "total_seconds": round(time.perf_counter() - t_start, 3),
    }
    result.files = {"plot": str(out_dir / PLOT_NAME), "json": str(out_dir / JSON_NAME)}
    plot_lr_find(result, out_dir / PLOT_NAME)
    atomic_write_json(out_dir / JSON_NAME, result.to_dict())
    return result
