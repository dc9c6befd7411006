"""PyTorch → TorchScript: traced (timm's CNNs have no data-dependent control flow) and frozen, so the
file runs from C++ (libtorch) or Python without transferlab, timm or the model's source code."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["export_torchscript", "load_torchscript"]


def export_torchscript(module: Any, example: Any, path: Path, *, dynamic_batch: bool, opset: int) -> dict[str, Any]:
    """Write `module` traced on `example` to `path`; a traced CNN takes any batch size, which the parity
    check verifies when `dynamic_batch` is asked for. `opset` is ONNX-only and ignored."""
    import torch

    # Silenced: tracer notes on python-side shape arithmetic (parity is the real check), and torch.jit's
    # deprecation notice (TorchScript remains what libtorch deployments load).
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, example, check_trace=False)  # parity below checks more, on real images
        frozen = torch.jit.freeze(traced.eval())
        torch.jit.save(frozen, str(path))
    return {"torch_version": torch.__version__}


def load_torchscript(path: Path, threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """A float32 (N, 3, H, W) batch → logits, through the TorchScript interpreter (its threads are torch's,
    set process-wide by ``_runtime.setup_torch``; `threads` is accepted for a uniform loader signature)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu")

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(x)).float().numpy()

    return run
