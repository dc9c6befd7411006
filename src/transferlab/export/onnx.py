"""PyTorch → ONNX, checked by onnx's own validator, run by onnxruntime.

Uses torch's TorchScript-based exporter (``dynamo=False``): for the convolutional backbones
transferlab trains it is mature, fast and needs no extra package (the dynamo exporter needs
onnxscript). The parity check in ``parity.py`` is what proves each file right, whichever exporter.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DEFAULT_OPSET", "export_onnx", "load_onnx"]

DEFAULT_OPSET = 17  # onnxruntime ≥ 1.14 and every current mobile/edge runtime read it
INPUT_NAME, OUTPUT_NAME = "input", "logits"


def export_onnx(module: Any, example: Any, path: Path, *, dynamic_batch: bool, opset: int) -> dict[str, Any]:
    """Write `module` traced on `example` to `path`; returns the sidecar fields this format adds."""
    import onnx
    import torch

    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes are not the user's to act on
        torch.onnx.export(module, (example,), str(path), dynamo=False, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], dynamic_axes=axes, opset_version=opset,
                          do_constant_folding=True)
    onnx.checker.check_model(str(path))
    return {"opset": opset, "onnx_version": onnx.__version__}


def load_onnx(path: Path, threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """A float32 (N, 3, H, W) batch → logits, through onnxruntime on the CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {INPUT_NAME: x})[0]
