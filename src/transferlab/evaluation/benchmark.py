"""What a model costs to run on this machine: median latency per batch, and peak memory.

Latency is the median of timed forward passes after warm-up (the first calls pay for allocator growth,
oneDNN kernel selection, CUDA context set-up), on a random input at the model's real size, in the
precision and memory format feature extraction uses (see ``training/feature_cache.extract_features``).

Memory is the weights plus the peak the forward pass adds on top of them:
  * CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
  * CPU (Linux): the process's peak resident set (``VmHWM``), reset just before through
    ``/proc/self/clear_refs``, after handing freed heap back to the OS (``malloc_trim``) so that memory
    an earlier model left in the allocator does not hide this one's. Elsewhere ``ru_maxrss``, which
    cannot be reset: then the number is a lower bound.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import re
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self

import torch
from torch import nn

__all__ = ["PeakMemory", "inference_cost", "measure_latency", "weights_mb"]

MB = 1024 * 1024
# Timed runs: at least MIN_RUNS, then more until MIN_SECONDS have passed or MAX_RUNS: batch 1 on a
# small model gets ~20 samples for a stable median; a big batch (hundreds of ms each, its spread a
# few %) gets 2, so that measuring latency stays small beside the one feature-extraction pass that
# `select` is allowed to cost.
MIN_RUNS, MAX_RUNS, MIN_SECONDS = 3, 20, 0.25
MIN_RUNS_LARGE_BATCH = 2
WARMUP = {1: 3}  # batch size -> warm-up runs; bigger batches warm up once
_STATUS = Path("/proc/self/status")


def weights_mb(model: nn.Module) -> float:
    """Bytes of parameters and buffers, in MiB."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) / MB


def _status_kb(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+)\s+kB", _STATUS.read_text(), flags=re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _trim_heap() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def _reset_cpu_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # "5": reset the peak RSS (Linux >= 4.0)
    except OSError:
        return False
    return True


def _maxrss_kb() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.mb``: the most memory the block added (MiB)."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.mb = 0.0
        self.exact = True

    def __enter__(self) -> Self:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self._base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            return self
        _trim_heap()
        rss = _status_kb("VmRSS")
        self.exact = rss is not None and _reset_cpu_peak()
        self._base = rss if self.exact else _maxrss_kb()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.mb = (torch.cuda.max_memory_allocated() - self._base) / MB
            return
        peak = _status_kb("VmHWM") if self.exact else _maxrss_kb()
        self.mb = max(0, (peak or 0) - self._base) / 1024


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _median_ms(run: Callable[[], Any], device: str, warmup: int, min_runs: int = MIN_RUNS) -> float:
    for _ in range(warmup):
        run()
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or (len(times) < MAX_RUNS and time.perf_counter() - start < MIN_SECONDS):
        t0 = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


@torch.no_grad()
def measure_latency(model: nn.Module, input_size: int, batch_size: int, *, device: str = "cpu",
                    autocast_dtype: torch.dtype | None = None) -> float:
    """Median milliseconds per forward pass of a batch (model in eval mode, on `device`)."""
    model.eval().to(device, memory_format=torch.channels_last)
    x = torch.randn(batch_size, 3, input_size, input_size, device=device).contiguous(
        memory_format=torch.channels_last)
    autocast = (torch.autocast(device_type=device, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())

    def run() -> None:
        with autocast:
            model(x)

    return _median_ms(run, device, WARMUP.get(batch_size, 1), MIN_RUNS if batch_size == 1 else MIN_RUNS_LARGE_BATCH)


def inference_cost(model: nn.Module, input_size: int, *, batch_sizes: Sequence[int] = (1, 32), device: str = "cpu",
                   autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """{latency_ms_b<N> per batch size, images_per_second (largest batch), peak_mem_mb, weights_mb}.

    Peak memory: weights + what the forward pass of the largest batch adds (see module docstring).
    """
    result: dict[str, float] = {}
    sizes = sorted(set(batch_sizes))
    for b in sizes[:-1]:
        result[f"latency_ms_b{b}"] = measure_latency(model, input_size, b, device=device, autocast_dtype=autocast_dtype)
    largest = sizes[-1]
    model.eval().to(device, memory_format=torch.channels_last)  # weights resident before the baseline
    with PeakMemory(device) as peak:
        result[f"latency_ms_b{largest}"] = measure_latency(model, input_size, largest, device=device,
                                                           autocast_dtype=autocast_dtype)
    result["images_per_second"] = largest / result[f"latency_ms_b{largest}"] * 1000
    result["weights_mb"] = weights_mb(model)
    result["peak_mem_mb"] = result["weights_mb"] + peak.mb
    return {k: round(v, 3) for k, v in result.items()}
