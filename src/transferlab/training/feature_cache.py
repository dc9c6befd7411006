"""Frozen-backbone features, computed once and reused.

The classic recipe re-runs the frozen backbone over the whole train set every head epoch; the
features never change, so we compute them once (optionally for K augmented views) and train the head
on the cached tensors — head epochs then cost milliseconds. The disk cache is keyed by a hash of the
backbone's actual weights, the preprocessing/augmentation and each file's content, so it is reused
across runs and can never serve stale features; it is validated (shape, dtype, key, and a SHA-256 of
the features' bytes stored in the file's metadata) before use and rebuilt when stale or corrupt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from transferlab._testing import pause_point
from transferlab.data.datasets import DecodedImages, ImageDataset
from transferlab.data.images import ImageError, file_digest
from transferlab.data.sources import Sample
from transferlab.data.threaded import threaded_batches
from transferlab.data.transforms import EvalView
from transferlab.io import load_tensors, save_tensors, tensor_metadata
from transferlab.models.heads import features_only, head_slot
from transferlab.paths import home
from transferlab.training.memory import AdaptiveBatch, activation_budget, forward_in_passes

log = logging.getLogger("transferlab")


def default_cache_dir() -> Path:
    return home() / "features"


def usable_cache_dir(cache_dir: str | Path | None) -> Path | None:
    """The disk cache folder (given or default), created; None — features stay in memory — when it
    cannot be created, so an unwritable cache never stops a run."""
    path = Path(cache_dir) if cache_dir else default_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("feature cache dir %s unusable (%s); keeping features in memory", path, exc)
        return None
    return path


def backbone_fingerprint(model: nn.Module) -> str:
    """Hash of every non-head parameter and buffer: exact identity of what the features depend on."""
    slot_prefix = _slot_prefix(model)
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if slot_prefix and name.startswith(slot_prefix):
            continue
        h.update(name.encode())
        t = tensor.detach().cpu().contiguous()
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:24]


def _slot_prefix(model: nn.Module) -> str:
    slot = head_slot(model)
    for name, module in model.named_modules():
        if module is slot:
            return name + "."
    return ""


# Bump when the extraction's numerics change (memory format, kernels): cached features from an
# older path would differ in the last bits and make cache hits and misses give different runs.
EXTRACTION_VERSION = 3  # 2: channels-last; 3: BatchNorm folded into the convolutions


def transform_tag(pre, autocast_dtype: torch.dtype | None, view: str = "eval", compiled: bool = False) -> str:
    """The part of a cache key that says how images became features: preprocessing (and which
    augmented view), the autocast precision, compiled or eager kernels (they differ in the last
    bits) and the extraction code version. Training and `select` both build their keys here, so
    they share cached features."""
    return (f"{view}:{json.dumps(pre.to_dict(), sort_keys=True)}:{autocast_dtype}:"
            f"v{EXTRACTION_VERSION}" + (":compiled" if compiled else ""))


# torch.compile of the frozen forward, measured on Lite0 at 224 px, bf16, batch 64, on this
# project's 2-core Xeon: 142 -> 221 img/s after 32.5 s of compilation, so it pays from about
# 13 000 images in one pass; "auto" compiles from 20 000 on CPU (GPUs: not measured, eager).
COMPILE_MIN_IMAGES = 20_000


def should_compile(setting: str, device: str, n_images: int) -> bool:
    """Whether the frozen forward is worth compiling: `setting` is on | off | auto."""
    if setting == "auto":
        return torch.device(device).type == "cpu" and n_images >= COMPILE_MIN_IMAGES
    return setting == "on"


class _CompiledForward:
    """torch.compile'd model, falling back to eager (with a warning) if compilation fails — no
    C compiler, an unsupported op — so a speed option can never cost a run."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.failed = model, False
        self.compiled = torch.compile(model, dynamic=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.failed:
            try:
                return self.compiled(x)
            except Exception as exc:  # noqa: BLE001 - any compiler failure: eager is always correct
                self.failed = True
                log.warning("torch.compile failed (%s: %s); extracting features eagerly", type(exc).__name__, exc)
        return self.model(x)


def feature_key(fingerprint: str, transform_tag: str, samples: Sequence[Sample]) -> str:
    h = hashlib.sha256()
    h.update(fingerprint.encode())
    h.update(transform_tag.encode())
    for s in samples:
        try:
            digest = file_digest(s.path)
        except ImageError as exc:  # gone since validation: keyed apart, read as ImageDataset reads such a file
            log.warning("%s: %s; its features are those of an unreadable file (DataSplits.drop_unreadable "
                        "skips such files before the feature pass)", s.path, exc.reason)
            digest = f"unreadable:{s.path}"
        h.update(digest.encode())
    return h.hexdigest()[:32]


@torch.no_grad()
def extract_features(
    model: nn.Module,
    samples: Sequence[Sample],
    transform: Callable,
    *,
    batch_size: int = 64,
    device: str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    num_workers: int = 0,
    generator_seed: int | None = None,
    progress: Callable[[int], None] | None = None,
    decoded: DecodedImages | None = None,
    max_memory: int | None = None,
    compiled: bool = False,
    kept_view: EvalView | None = None,
    decode_threads: int = 1,
    tap: tuple[str, Callable[[torch.Tensor], None]] | None = None,
) -> torch.Tensor:
    """One forward pass of the frozen backbone over `samples` → float32 [N, feature_dim].

    `compiled`: through torch.compile (fixed shapes: the last batch is padded, not recompiled).

    A batch that runs out of memory (or over `max_memory` bytes of activations) is split in halves.
    `decoded` (optional) keeps the decoded images for the fine-tuning epochs that follow; the
    pixels fed to the backbone are the file's own either way (exact), so features do not depend on it.
    `kept_view` (``transforms.eval_view``, the split of `transform`) also keeps the resized uint8 images
    there, for validation images that fine-tuning evaluates every epoch.
    `decode_threads` > 1 (in-process loading, ``num_workers=0``): images are decoded on that many
    threads while the backbone runs (``data.threaded``); only for a deterministic `transform`.
    `tap` (module name, callback): the callback receives that module's output for every batch, in
    order — the boundary cache of training/boundary.py reads the activations of this same pass
    instead of running the bottom of the network again. Not with `compiled`.
    """
    was_training = model.training
    model.eval()
    frozen = inference_copy(model)
    dataset = ImageDataset(list(samples), transform, decoded=decoded, exact_pixels=True, kept_view=kept_view)
    # An explicit generator: iterating a DataLoader without one draws from torch's global RNG,
    # which would make a cache miss and a cache hit leave different RNG states behind.
    generator = torch.Generator().manual_seed(generator_seed if generator_seed is not None else 0)
    device_type = torch.device(device).type  # "cuda:1" (one rank's GPU) autocasts as "cuda"
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]]
    if num_workers == 0 and decode_threads > 1:
        loader = threaded_batches(dataset, batch_size, decode_threads)
    else:
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            generator=generator,
            pin_memory=device_type == "cuda",
            persistent_workers=False,
        )
    chunks = []
    autocast = (
        torch.autocast(device_type=device_type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    # channels-last convolutions are ~1.5x faster on CPU with bf16 (measured, Lite0 224 px)
    model.to(memory_format=torch.channels_last)
    frozen.to(memory_format=torch.channels_last)
    passes = AdaptiveBatch("feature extraction")
    tapped: list[torch.Tensor] = []  # the tapped module's outputs for the current batch, pass by pass
    handle = None
    if tap is not None:
        if compiled:
            raise ValueError("extract_features: a tap needs the eager forward (compiled=False)")
        handle = frozen.get_submodule(tap[0]).register_forward_hook(lambda _m, _i, out: tapped.append(out.detach()))
    try:
        with features_only(frozen), autocast, activation_budget(frozen, max_memory):
            forward = _CompiledForward(frozen) if compiled else frozen
            for images, _ in loader:
                images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                n = len(images)
                if compiled and n < batch_size:
                    pad = images.new_zeros((batch_size - n, *images.shape[1:]))
                    images = torch.cat([images, pad]).contiguous(memory_format=torch.channels_last)
                tapped.clear()
                chunks.append(torch.cat(forward_in_passes(forward, images, passes, tapped.clear))[:n])
                if tap is not None:
                    tap[1](torch.cat(tapped))
                if progress is not None:
                    progress(len(images))
                pause_point("extract_batch")
    finally:
        if handle is not None:
            handle.remove()
        model.train(was_training)
    dim = head_slot(model).in_features
    return torch.cat(chunks) if chunks else torch.empty(0, dim)


def inference_copy(model: nn.Module) -> nn.Module:
    """The frozen backbone only infers in a feature pass: a copy of `model` (in eval mode) with its
    BatchNorms folded into the convolutions before them (models/fold_bn.py; Lite0 bf16 at 288 px
    50.4 -> 73.5 img/s), or `model` itself when nothing folds."""
    from transferlab.models.fold_bn import folded_for_inference

    pre = getattr(model, "preprocessing", None)
    return model if pre is None else folded_for_inference(model, pre.input_size)


def cached_features(
    model: nn.Module,
    samples: Sequence[Sample],
    transform: Callable,
    transform_tag: str,
    *,
    cache_dir: Path | None,
    fingerprint: str | None = None,
    **extract_kwargs,
) -> tuple[torch.Tensor, bool]:
    """Features from the disk cache when valid, else extracted (and stored). Returns (features, hit)."""
    if cache_dir is None:
        return extract_features(model, samples, transform, **extract_kwargs), False
    fingerprint = fingerprint or backbone_fingerprint(model)
    key = feature_key(fingerprint, transform_tag, samples)
    dim = head_slot(model).in_features
    feats = load_cached_features(cache_dir, key, len(samples), dim)
    if feats is not None:
        return feats, True
    feats = extract_features(model, samples, transform, **extract_kwargs)
    store_cached_features(cache_dir, key, feats, transform_tag)
    return feats, False


def tensor_checksum(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and raw bytes: what the cache file must still hold when read."""
    t = tensor.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}".encode())
    h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b"")
    return h.hexdigest()


def load_cached_features(cache_dir: Path, key: str, n: int, dim: int) -> torch.Tensor | None:
    """The cached [n, dim] features stored under `key`, or None when absent, stale or corrupt.

    Besides key, shape and dtype, the features' bytes must match the SHA-256 stored in the file's
    metadata when it was written: a flipped bit (a NaN, a value off by a power of two) is caught here,
    logged and rebuilt, never trained on."""
    path = Path(cache_dir) / f"{key}.safetensors"
    if not path.exists():
        return None
    try:
        data = load_tensors(path)
        feats = data["features"]
        stored_key = "".join(chr(int(c)) for c in data["key"].tolist())
        if stored_key != key or feats.dtype != torch.float32 or tuple(feats.shape) != (n, dim):
            log.warning("feature cache %s is stale (key/shape mismatch); rebuilding", path.name)
            return None
        expected = json.loads(tensor_metadata(path).get("info", "{}")).get("sha256")
        if expected is None:
            log.warning("feature cache %s is stale (written without a checksum); rebuilding", path.name)
            return None
        if tensor_checksum(feats) != expected:
            log.warning("feature cache %s is corrupt (checksum mismatch: its features changed on disk since "
                        "they were written); rebuilding", path.name)
            return None
        # a fresh, allocator-aligned copy: BLAS may sum a matmul in another order over a buffer at the
        # file's offset than over a torch allocation, and a cache hit must reproduce a miss exactly
        return feats.clone()
    except Exception as exc:  # noqa: BLE001 - any corrupt cache is rebuilt, never trusted
        log.warning("feature cache %s is corrupt (%s); rebuilding", path.name, exc)
    return None


def store_cached_features(cache_dir: Path, key: str, feats: torch.Tensor, transform_tag: str) -> None:
    """Write features under `key`; a failed write costs only the reuse, never the run."""
    path = Path(cache_dir) / f"{key}.safetensors"
    try:
        key_tensor = torch.tensor([ord(c) for c in key], dtype=torch.uint8)
        info = {"n": len(feats), "dim": feats.shape[1] if feats.dim() == 2 else 0, "tag": transform_tag,
                "sha256": tensor_checksum(feats)}
        save_tensors(path, {"features": feats, "key": key_tensor}, metadata={"info": json.dumps(info)})
    except OSError as exc:
        log.warning("could not write feature cache to %s (%s); continuing without it", path, exc)
