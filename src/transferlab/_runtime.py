"""Process-level tuning: memory allocator, threads, precision. Applied once, on purpose, at start-up.

Why the allocator: with glibc's defaults, every large activation buffer freed after a batch is handed
back to the kernel and faulted back in on the next batch; measured on a 2-core Xeon this made about
half of a CPU forward pass page-fault handling. Raising the mmap/trim thresholds keeps the memory in
the process (results are bit-identical, only faster). Disable with TRANSFERLAB_TUNE_MALLOC=0.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import os
import platform

log = logging.getLogger("transferlab")

# glibc mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 * 1024 * 1024  # the largest value glibc accepts on 64-bit (HEAP_MAX/2)
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: "never trim" in practice
TOP_PAD = 1024 * 1024 * 1024


@functools.cache
def tune_allocator() -> bool:
    """Stop glibc from returning freed memory to the kernel after every batch. Returns True if applied."""
    if os.environ.get("TRANSFERLAB_TUNE_MALLOC", "1") == "0":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = all(
            libc.mallopt(param, value) == 1
            for param, value in (
                (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                (_M_TOP_PAD, TOP_PAD),
            )
        )
    except (OSError, AttributeError):
        return False
    if ok:
        log.debug("glibc allocator tuned (mmap threshold 32 MiB, no trim)")
    return ok


def physical_cores() -> int:
    """Physical cores available to this process (hyper-threads only slow down torch's GEMMs)."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:
        available = os.cpu_count() or 1
    siblings = 1
    try:
        with open("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list") as f:
            text = f.read().strip()
        siblings = max(1, sum(len(range(int(a), int(b) + 1)) if "-" in part else 1
                               for part in text.split(",") for a, _, b in [part.partition("-")]))
    except (OSError, ValueError):
        pass
    return max(1, available // siblings)


def default_num_workers() -> int:
    """Data-loader processes: none on ≤ 2 cores, where a loader process steals a core from the
    forward pass (measured faster in-line), else half the cores up to 8."""
    cores = physical_cores()
    return 0 if cores <= 2 else min(8, cores // 2)


def decode_threads() -> int:
    """Threads that decode images for an in-process, deterministic pass (``data.threaded``): PIL
    works without the GIL, so decoding overlaps the forward pass even on 2 cores."""
    return max(2, min(8, physical_cores()))


@functools.cache
def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 (AVX512-BF16 or AMX): detected, never assumed."""
    try:
        import torch

        if not torch.backends.mkldnn.is_available():
            return False
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


def setup_torch(threads: int | None = None) -> None:
    """Threads = physical cores; the allocator tuned. Idempotent."""
    import torch

    tune_allocator()
    if threads is None:
        threads = int(os.environ.get("TRANSFERLAB_THREADS", physical_cores()))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def deterministic_scope():
    """Deterministic mode without its NaN fill inside; torch's process-wide determinism flags as they
    were on leaving.

    Deterministic mode also fills every new uninitialised tensor with NaN, so that a kernel reading
    memory it never wrote fails the same way each time. Our kernels write what they allocate: the fill
    only costs memory bandwidth — measured, a Lite0 fine-tuning step at 224 px, batch 32, fp32 on this
    2-core CPU: 19.7-21.1 img/s with it, 25.2-26.5 without (deterministic mode off: 25.4-26.9), and
    same-seed runs still give identical metrics. Lightning's ``Trainer(deterministic=True)``, created
    inside, switches deterministic algorithms on (it leaves the fill alone) for the whole process and
    never off, so a Python caller of ``train`` would otherwise keep them, and their cost, after it returned.
    It also sets ``torch.backends.cudnn.benchmark`` (off when deterministic) and the environment's
    ``CUBLAS_WORKSPACE_CONFIG``; both are handed back too, or a GPU user's own code after ``train``
    would lose cuDNN's autotuning.
    """
    import torch
    import torch.utils.deterministic

    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    cudnn_benchmark = torch.backends.cudnn.benchmark
    cublas_workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill
        torch.backends.cudnn.benchmark = cudnn_benchmark
        if cublas_workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas_workspace


def device_unavailable(device: str) -> str | None:
    """Why an explicit --device cannot run on this machine (None when it can, or for 'auto'), checked
    before any work: the deep-stack error would otherwise come after the frozen stage."""
    import torch

    if device in ("cuda", "gpu") and not torch.cuda.is_available():
        return (f"device '{device}' asked for, but torch sees no CUDA GPU on this machine (torch "
                f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}); use --device cpu or auto")
    if device == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        return "device 'mps' asked for, but Apple's Metal backend is not available here; use --device cpu or auto"
    return None


def resolve_accelerator(device: str = "auto") -> str:
    """'cpu' | 'cuda' | 'mps' from 'auto' or an explicit choice ('gpu' is Lightning's name for 'cuda')."""
    import torch

    if device == "gpu":
        return "cuda"
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_precision(precision: str, accelerator: str, *, training: bool) -> str:
    """'auto' → the fastest precision measured for this kind of work (Lightning's names).

    On CPUs with native bf16, autocast speeds up the frozen forward pass (Lite0, 224 px, channels
    last: 105 vs 62 img/s) but not a training step, whose backward through depthwise convolutions
    is slower in bf16 (15 vs 23 img/s) — so CPU training stays fp32. GPUs use bf16 (or fp16).
    """
    import torch

    if precision != "auto":
        return precision
    if accelerator == "cuda":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if accelerator == "cpu" and cpu_supports_bf16() and not training:
        return "bf16-mixed"
    return "32-true"


def autocast_dtype(precision: str):
    """The autocast dtype for a Lightning precision string, or None for full precision."""
    import torch

    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
