"""`transferlab bench-infer`: how fast one trained model runs here, per runtime and batch size.

Each runtime gets the same preprocessed random batch (the model's real input size), a few warm-up
calls (allocator growth, kernel selection, ORT graph optimisation), then timed calls until `seconds`
have passed and at least `min_runs` were made. Latency percentiles are per call (one batch);
images/s is images scored over the timed wall time. The TorchScript and ONNX files are exported
to a temporary folder through ``export_run`` — with its parity check, so a fast wrong model can
never be reported — and all runtimes share the same thread count (TRANSFERLAB_THREADS, else physical cores).
Image decoding and resizing are excluded: they cost the same whatever runs the model.

Wall-clock figures are what a user gets, and on a shared machine they depend on everyone else's work;
CPU milliseconds per image (all of this process's threads, spin-waiting included) depend much less on
it, so both are reported, with the load average before and after.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from transferlab import _runtime
from transferlab.errors import TransferlabError
from transferlab.export.predictors import inference_threads

__all__ = ["RUNTIMES", "bench_infer"]

WARMUP_RUNS = {1: 5}  # batch size → warm-up calls; larger batches warm up twice
MAX_RUNS = 10_000

Runner = Callable[[np.ndarray], Any]


def _eager(run: Path, workdir: Path, threads: int) -> Runner:
    """The run's model in PyTorch eager, fp32, channels-last: what `predict` and `serve` run."""
    import torch

    from transferlab.evaluation.predict import load_inference_model

    # BatchNorm folded and channels-last, as `predict` and `serve` run it
    model = load_inference_model(run)[0].to(memory_format=torch.channels_last)

    def forward(x: np.ndarray) -> Any:
        with torch.inference_mode():
            return model(torch.from_numpy(x).contiguous(memory_format=torch.channels_last))

    return forward


def _exported(fmt: str) -> Callable[[Path, Path, int], Runner]:
    def load(run: Path, workdir: Path, threads: int) -> Runner:
        from transferlab.export.exporter import FORMATS, export_run

        result = export_run(run, fmt, out=workdir / f"model{FORMATS[fmt].extension}", dynamic_batch=True,
                            parity_count=4)
        return FORMATS[fmt].load(result.path, threads=threads)

    return load


RUNTIMES: dict[str, Callable[[Path, Path, int], Runner]] = {
    "pytorch": _eager,
    "torchscript": _exported("torchscript"),
    "onnxruntime": _exported("onnx"),
}
"""Runtime name → loader (run, scratch folder, threads) → batch → output."""


def _time(runner: Runner, x: np.ndarray, seconds: float, min_runs: int) -> dict[str, float]:
    for _ in range(WARMUP_RUNS.get(len(x), 2)):
        runner(x)
    times: list[float] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    while len(times) < MAX_RUNS and (len(times) < min_runs or time.perf_counter() - start < seconds):
        t0 = time.perf_counter()
        runner(x)
        times.append(time.perf_counter() - t0)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    ms = np.asarray(times) * 1000
    return {"runs": len(times), "p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p95_ms": round(float(np.percentile(ms, 95)), 3),
            "images_per_second": round(len(x) * len(times) / wall, 2),
            "cpu_ms_per_image": round(cpu * 1000 / (len(x) * len(times)), 3)}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def bench_infer(run: str | Path, *, batch_sizes: Sequence[int] = (1, 32), runtimes: Sequence[str] | None = None,
                seconds: float = 3.0, min_runs: int = 5, threads: int | None = None,
                on_row: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """{"rows": [{runtime, batch_size, runs, p50_ms, p95_ms, images_per_second, cpu_ms_per_image}],
    "environment": {...}}."""
    import onnxruntime
    import torch

    from transferlab.evaluation.predict import load_run_model

    names = list(runtimes or RUNTIMES)
    unknown = [n for n in names if n not in RUNTIMES]
    if unknown:
        raise TransferlabError(f"Unknown runtime(s) {', '.join(unknown)}: choose from {', '.join(RUNTIMES)}.")
    if not batch_sizes or min(batch_sizes) < 1:
        raise TransferlabError("batch sizes must be positive integers, e.g. --batch-sizes 1,32")
    threads = threads or inference_threads()
    _runtime.setup_torch(threads)
    run = Path(run)
    _, meta = load_run_model(run)  # fails early, with the usual message, on a directory without a model
    size = int(meta["preprocessing"]["input_size"])
    load_before = _load()
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="transferlab-bench-") as workdir:
        for name in names:
            runner = RUNTIMES[name](run, Path(workdir), threads)
            _runtime.setup_torch(threads)  # exporting set torch's threads back to its own default
            for b in batch_sizes:
                x = rng.standard_normal((b, 3, size, size), dtype=np.float32)
                row = {"runtime": name, "batch_size": b, **_time(runner, x, seconds, min_runs)}
                rows.append(row)
                if on_row is not None:
                    on_row(row)
            del runner
    return {
        "rows": rows,
        "environment": {
            "model": meta["backbone"]["name"], "input_size": size, "classes": len(meta["classes"]),
            "cpu": _cpu_name(), "threads": threads, "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "load_average_before": load_before, "load_average_after": _load(),
            "seconds_per_cell": seconds,
        },
    }
