"""Stage 1, the frozen feature pass: the sizes it runs at, the decoded-image cache it fills, and the
features of every train and val image (from the disk cache when valid).

Shared by `train` (training/run.py), `lr-find` and the data doctor, which read the very features
training caches.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from transferlab import _runtime
from transferlab.config import TrainConfig, parse_size
from transferlab.data.datasets import DecodedImages, label_targets
from transferlab.data.sources import DataSplits
from transferlab.data.transforms import Preprocessing, eval_transform, eval_view, train_transform
from transferlab.errors import TransferlabError
from transferlab.logs import progress_bar
from transferlab.models.registry import BackboneSpec
from transferlab.training import boundary, distributed
from transferlab.training.feature_cache import backbone_fingerprint, should_compile, transform_tag, usable_cache_dir

log = logging.getLogger("transferlab")

__all__ = ["check_any_input_size", "decoded_images", "frozen_features", "resolve_sizes"]


def resolve_sizes(cfg: TrainConfig, spec: BackboneSpec) -> tuple[BackboneSpec, Preprocessing]:
    """Fill in img_size (training crops) and eval_size (frozen features, validation, the saved model's
    preprocessing); returns the spec at eval_size and the preprocessing at img_size.

    Pretrained on random-resized crops, a network sees objects larger in training than in a plain
    resize of the same size, so it classifies best at a higher test resolution (FixRes). Measured
    with efficientnet_lite0's frozen features on ants/bees: 145.2 -> 147.0 of 153 val images right at
    288 px instead of 224 (linear head, 6 seeds), for 1.65x the forward cost."""
    if cfg.img_size is None:
        cfg.img_size = spec.preprocessing.input_size
    if cfg.eval_size is None:
        cfg.eval_size = spec.test_size or cfg.img_size
    train_pre = spec.preprocessing.with_size(cfg.img_size)
    return dataclasses.replace(spec, preprocessing=spec.preprocessing.with_size(cfg.eval_size)), train_pre


def check_any_input_size(model: torch.nn.Module, cfg: TrainConfig) -> None:
    """A model with a fixed input size (a ViT's position embeddings) cannot train at one size and
    evaluate at another: say so before any work, not mid-fine-tuning."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, cfg.img_size, cfg.img_size))
    except (RuntimeError, AssertionError, ValueError) as exc:
        raise TransferlabError(f"This backbone takes one fixed input size, so --eval-size {cfg.eval_size} must equal "
                          f"--img-size {cfg.img_size} (set both, or neither). ({str(exc).splitlines()[0]})") from None
    finally:
        model.train(was_training)


def decoded_images(cfg: TrainConfig) -> DecodedImages | None:
    """The in-memory decoded-image cache shared by feature extraction and fine-tuning epochs.
    Only with in-process loading: each loader worker would hold its own copy."""
    if not cfg.decode_cache or cfg.num_workers:
        return None
    # what the training augmentations read: twice the crop side is more than any preset's crop needs
    return DecodedImages(max_side=2 * cfg.img_size, max_bytes=int(cfg.decode_cache_mb * 2**20))


def frozen_features(model, splits: DataSplits, cfg: TrainConfig, spec: BackboneSpec, views_pre: Preprocessing,
              ranks: distributed.Ranks, autocast, decoded: DecodedImages | None = None,
              tap: str | None = None, tapped: dict[str, torch.Tensor] | None = None):
    """Train features (plain + K augmented views) and val features, from the cache when valid.
    Over several processes each extracts its shard; the result is on rank 0 (None elsewhere).
    `tap` (a module's name, one process): its activations of the plain train and the val images go
    into `tapped` under the split's name, for each split extracted (not read from the cache)."""
    device = ranks.device
    model.to(device)
    cache_dir = usable_cache_dir(cfg.cache_dir) if cfg.feature_cache == "disk" else None
    fingerprint = backbone_fingerprint(model) if cache_dir is not None and ranks.is_zero else None
    cfg_pre = spec.preprocessing  # at eval_size: plain train and val features; views_pre (img_size): augmented views
    n_images = len(splits.train) * (1 + cfg.feature_views) + len(splits.val)
    compiled = should_compile(cfg.compile, device, n_images) and tap is None
    if compiled:
        log.info("frozen forward through torch.compile (%d images)", n_images)
    jobs = [("train", splits.train, eval_transform(cfg_pre), transform_tag(cfg_pre, autocast, compiled=compiled), None)]
    # Augmented views draw their randomness per shard, so N processes make other (equally valid)
    # views than one: their cache entries are kept apart by the process count.
    views_by = f":world{ranks.world_size}" if ranks.world_size > 1 else ""
    for v in range(1, cfg.feature_views + 1):
        tag = transform_tag(views_pre, autocast, view=f"aug:{cfg.augment}:view{v}:seed{cfg.seed}{views_by}",
                            compiled=compiled)
        jobs.append(("train", splits.train, train_transform(views_pre, cfg.augment), tag,
                     cfg.seed * 1000 + v + 7919 * ranks.rank))
    jobs.append(("val", splits.val, eval_transform(cfg_pre), jobs[0][3], None))

    results: dict[str, list[torch.Tensor]] = {"train": [], "val": []}
    n_extracted = 0
    total = sum(len(j[1]) for j in jobs)
    # rank 0 advances by its shard: the bar shows the share of the whole pass done
    with progress_bar(cfg.progress and ranks.is_zero, "extracting features", -(-total // ranks.world_size)) as advance:
        for split, samples, transform, tag, seed in jobs:
            if seed is not None:
                torch.manual_seed(seed)
            chunks: list[torch.Tensor] = []
            tap_kwargs = ({"tap": (tap, lambda out: chunks.append(out.to(boundary.STORAGE_DTYPE)))}
                          if tap is not None and seed is None else {})
            feats, hit = distributed.sharded_features(
                ranks, model, samples, transform, tag, cache_dir=cache_dir, fingerprint=fingerprint,
                batch_size=max(cfg.batch_size, 64), device=device, autocast_dtype=autocast,
                num_workers=cfg.num_workers, generator_seed=seed, decoded=decoded,
                max_memory=parse_size(cfg.max_memory), compiled=compiled,
                kept_view=eval_view(cfg_pre) if split == "val" else None,  # fine-tuning's validation reads them
                # decoding on threads beside the forward pass; augmented views stay in one thread (RNG order)
                decode_threads=_runtime.decode_threads() if seed is None else 1,
                progress=advance, **tap_kwargs,
            )
            if chunks and tapped is not None:
                tapped[split] = torch.cat(chunks)
            if hit:
                advance(-(-len(samples) // ranks.world_size))
                log.info("%s features: cache hit (%d images)", split, len(samples))
            else:
                n_extracted += len(samples)
            results[split].append(feats)
    model.to("cpu")
    if not ranks.is_zero:
        return None, n_extracted
    train_y = label_targets(splits.train, len(splits.classes), splits.multilabel)
    train_x = torch.cat(results["train"])
    train_y = train_y.repeat(len(results["train"]), *[1] * (train_y.ndim - 1))
    val_x = results["val"][0]
    val_y = label_targets(splits.val, len(splits.classes), splits.multilabel)
    return (train_x, train_y, val_x, val_y), n_extracted
