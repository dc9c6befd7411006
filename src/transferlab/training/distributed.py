"""One run over many processes (devices × nodes), through Lightning — no home-made launcher.

Every process runs `train` from the top: torchrun and SLURM start them so, and Lightning's own
launcher does the same for `--devices N` (it re-runs the command once per extra local device). So
the driver is rank-aware from its first step:

* work that must happen once — reading and validating the data, training the head on cached
  features, writing the run directory — runs on rank 0 and its result is broadcast, *or its error*,
  so a bad input stops every rank with the same message instead of leaving them waiting forever;
* work that parallelises — the frozen forward pass, fine-tuning — is split over the ranks.

Lightning Fabric launches the processes and owns the process group and the collectives; the
fine-tuning stage's Trainer then joins the same process group.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from transferlab.errors import TransferlabError
from transferlab.models.heads import head_slot
from transferlab.training import feature_cache

log = logging.getLogger("transferlab")

T = TypeVar("T")

# Rows per all_gather when assembling features: bounds the device memory a gather needs, whatever
# the dataset size (a million 1 280-d features would be 5 GB in one piece).
GATHER_BLOCK_ROWS = 4096


@dataclass
class Ranks:
    """Where this process stands in the run; a single process is rank 0 of 1 and every collective
    is then a no-op, so the single-device path runs exactly as without this layer."""

    fabric: Any = None
    rank: int = 0
    world_size: int = 1
    device: Any = "cpu"

    @property
    def is_zero(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.fabric is not None:
            self.fabric.barrier()

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank."""
        return obj if self.fabric is None else self.fabric.broadcast(obj, src=0)

    def on_zero(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 only; every rank returns its result or raises its error."""
        if self.fabric is None:
            return fn()
        result: Any = None
        error: Exception | None = None
        if self.is_zero:
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
                error = exc
        if error is not None:
            portable = error if isinstance(error, TransferlabError) else RuntimeError(
                f"rank 0 failed: {type(error).__name__}: {error}")
            self.broadcast(("error", portable))
            raise error
        kind, value = self.broadcast(("ok", result))
        if kind == "error":
            raise value
        return value

    def gather_rows(self, mine: torch.Tensor, total: int) -> torch.Tensor | None:
        """Assemble a [total, D] tensor of which each rank holds its `shard_bounds` rows; the result
        on rank 0 (in sample order), None elsewhere."""
        if self.fabric is None:
            return mine
        chunk = -(-total // self.world_size)
        padded = torch.zeros(chunk, *mine.shape[1:], dtype=mine.dtype)
        padded[: len(mine)] = mine
        blocks = []
        for i in range(0, max(chunk, 1), GATHER_BLOCK_ROWS):
            block = padded[i : i + GATHER_BLOCK_ROWS].to(self.device)  # NCCL gathers device tensors
            parts = [torch.empty_like(block) for _ in range(self.world_size)]
            torch.distributed.all_gather(parts, block)  # in Fabric's process group
            if self.is_zero:
                blocks.append(torch.stack(parts).cpu())  # [world, rows, D]
        if not self.is_zero:
            return None
        full = torch.cat(blocks, dim=1)  # [world, chunk, D]: rank r's rows are r*chunk ...
        return full.reshape(self.world_size * chunk, *mine.shape[1:])[:total].contiguous()


def launch(devices: int, num_nodes: int, accelerator: str) -> Ranks:
    """Start (or join) the process group when the run spans more than one process.

    With `devices` > 1 and no external launcher, Lightning re-runs this command once per extra
    device and each copy arrives here as another rank; under torchrun/SLURM the processes already
    exist and Lightning reads their ranks from the environment."""
    if devices * num_nodes == 1:
        return Ranks(device=accelerator)
    from lightning.fabric import Fabric

    # The collectives only need a process group; the fine-tuning strategy (DDP/FSDP) is the
    # Trainer's business and joins this same group.
    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy="ddp")
    fabric.launch()
    ranks = Ranks(fabric=fabric, rank=fabric.global_rank, world_size=fabric.world_size, device=str(fabric.device))
    if not ranks.is_zero:
        # one voice: rank 0 logs progress; the others only warnings and errors
        logging.getLogger("transferlab").setLevel(logging.WARNING)
    return ranks


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous slice [start, end) of n items for `rank`: equal chunks, the last ones shorter."""
    chunk = -(-n // world_size)
    return min(rank * chunk, n), min((rank + 1) * chunk, n)


def sharded_features(
    ranks: Ranks,
    model: torch.nn.Module,
    samples: Sequence,
    transform: Callable,
    tag: str,
    *,
    cache_dir: Path | None,
    fingerprint: str | None,
    progress: Callable[[int], None] | None = None,
    **extract_kwargs: Any,
) -> tuple[torch.Tensor | None, bool]:
    """Frozen features of `samples`, each rank extracting its shard once; rank 0 gets the whole
    tensor (others None) and stores it in the disk cache under the single-process key, so a cache
    written by N processes is found by 1 and the other way round. Returns (features, cache hit)."""
    if ranks.world_size == 1:
        return feature_cache.cached_features(model, samples, transform, tag, cache_dir=cache_dir,
                                             fingerprint=fingerprint, progress=progress, **extract_kwargs)
    dim = head_slot(model).in_features
    key = cached = None
    if ranks.is_zero and cache_dir is not None:
        key = feature_cache.feature_key(fingerprint or feature_cache.backbone_fingerprint(model), tag, samples)
        cached = feature_cache.load_cached_features(cache_dir, key, len(samples), dim)
    if ranks.broadcast(cached is not None):
        return cached, True
    start, end = shard_bounds(len(samples), ranks.rank, ranks.world_size)
    mine = feature_cache.extract_features(model, samples[start:end], transform, progress=progress, **extract_kwargs)
    feats = ranks.gather_rows(mine, len(samples))
    if ranks.is_zero and cache_dir is not None:
        feature_cache.store_cached_features(cache_dir, key, feats, tag)
    return feats, False


class ShardSampler(torch.utils.data.Sampler[int]):
    """Evaluation order for one rank: every `world_size`-th item, no padding — each val image is
    scored exactly once over all ranks, and the per-rank sums are added up afterwards."""

    def __init__(self, n: int, rank: int, world_size: int) -> None:
        self.n, self.rank, self.world_size = n, rank, world_size

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world_size))


def trainer_strategy(name: str, world_size: int) -> Any:
    """Lightning's strategy for fine-tuning. The data is sharded by our own samplers (exact resume
    needs their epoch seeding), so Lightning must not add its DistributedSampler on top."""
    if world_size == 1 and name == "auto":
        return "auto"
    if name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        # use_orig_params: blocks frozen by the LR policy keep requires_grad=False inside FSDP units
        return FSDPStrategy(use_orig_params=True)
    return "ddp"
