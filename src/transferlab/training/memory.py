"""A batch that does not fit in memory is split in halves, not fatal.

When a forward (or forward + backward) pass runs out of memory — CUDA's ``OutOfMemoryError``, the
CPU allocator's failure (both recognised by Lightning's ``is_oom_error``, as its batch-size finder
does), or the ``--max-memory`` activation budget below — the batch is redone in halves, and the
smaller size is kept (for the rest of that pass over the data, or of the fine-tuning) and logged.
Fine-tuning accumulates the halves' gradients before its one optimizer step, so the effective batch
size, the LR schedule and the step count stay as configured (only BatchNorm in train mode sees the
smaller batches).

CPU memory cannot be measured per batch (the process keeps freed memory, see ``_runtime``), so the
``--max-memory`` guard is an estimate: the bytes of every layer's output during one pass, which is
what a backward pass keeps alive. It does not count weights, optimizer state or the data loader.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from transferlab.config import SIZE_UNITS
from transferlab.errors import TransferlabError

log = logging.getLogger("transferlab")

class OutOfMemory(TransferlabError):
    """Even a single image does not fit."""


class MemoryBudgetExceeded(RuntimeError):
    """The activation estimate of one pass went over ``--max-memory`` (treated as out-of-memory)."""


def format_size(n: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if n >= SIZE_UNITS[unit]:
            return f"{n / SIZE_UNITS[unit]:.3g}{unit}"
    return f"{n}B"


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryBudgetExceeded)):
        return True
    from lightning.pytorch.utilities.memory import is_oom_error  # imported only when something failed

    return is_oom_error(exc)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class AdaptiveBatch:
    """How many images one pass may take: unlimited until an out-of-memory error, halved at each."""

    def __init__(self, what: str, min_size: int = 1) -> None:
        self.what = what
        self.min_size = min_size  # 2 where BatchNorm normalises with the batch's own statistics
        self.size: int | None = None  # None: the whole batch in one pass

    def run(self, n: int, step: Callable[[int, int], None], reset: Callable[[], None]) -> None:
        """Call ``step(start, stop)`` over ``range(n)`` in passes of at most ``self.size`` images.

        On out-of-memory the whole batch is redone from ``reset()`` with half the size: a pass that
        failed half-way may have left partial gradients behind, so no partial work is kept.
        """
        while True:
            size = min(n, self.size or n)
            try:
                for start in range(0, n, size):
                    step(start, min(n, start + size))
                return
            except Exception as exc:
                if not is_oom(exc):
                    raise
                if size // 2 < self.min_size:
                    raise OutOfMemory(
                        f"{self.what}: out of memory with {size} image(s) per pass ({exc}). Use a smaller "
                        "--img-size, a smaller backbone, or raise --max-memory."
                    ) from exc
            # outside the except block, so the failed pass's tensors (held by the traceback) are freed
            reset()
            _free_memory()
            self.size = size // 2
            log.warning("%s: out of memory with %d images per pass; continuing with batches of %d",
                        self.what, size, self.size)


def forward_in_passes(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, passes: AdaptiveBatch,
                      also_reset: Callable[[], None] | None = None) -> list[torch.Tensor]:
    """`model` over `images` in `passes`' sizes (halved on out-of-memory): the outputs, as float32 on the CPU."""
    done: list[torch.Tensor] = []

    def reset() -> None:
        done.clear()
        if also_reset is not None:
            also_reset()

    passes.run(len(images), lambda a, b: done.append(model(images[a:b]).float().cpu()), reset)
    return done


@contextmanager
def activation_budget(model: nn.Module, max_bytes: int | None) -> Iterator[None]:
    """While active, a forward pass of `model` whose layer outputs add up to more than `max_bytes`
    raises MemoryBudgetExceeded (counted from the top-level call). No-op when max_bytes is None."""
    if max_bytes is None:
        yield
        return
    used = [0]

    def start(_module, _inputs) -> None:
        used[0] = 0

    def count(module, _inputs, output) -> None:
        if isinstance(output, torch.Tensor):
            used[0] += output.numel() * output.element_size()
        if used[0] > max_bytes:
            raise MemoryBudgetExceeded(
                f"out of memory: this pass needs more than --max-memory {format_size(max_bytes)} of activations"
            )

    handles = [model.register_forward_pre_hook(start)]
    handles += [m.register_forward_hook(count) for m in model.modules() if not any(True for _ in m.children())]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
