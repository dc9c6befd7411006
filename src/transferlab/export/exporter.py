"""`transferlab export`: a trained run → an ONNX or TorchScript file, its sidecar, and proof of parity.

The file is written under a temporary name, checked against the PyTorch model on real images
(``parity.py``), and only then takes its real name: a file that fails the check never looks deployable.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from transferlab import _runtime
from transferlab._version import __version__
from transferlab.data.transforms import Preprocessing
from transferlab.errors import TransferlabError
from transferlab.evaluation.calibration import Tempered, temperature_of
from transferlab.evaluation.predict import load_run_model
from transferlab.export.onnx import DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAME, export_onnx, load_onnx
from transferlab.export.parity import ParityError, check_parity, parity_images
from transferlab.export.predictors import task_of
from transferlab.export.sidecar import SIDECAR_FORMAT, sidecar_path
from transferlab.export.torchscript import export_torchscript, load_torchscript
from transferlab.io import atomic_write_json, ensure_writable_dir
from transferlab.run_dir import model_files

__all__ = ["FORMATS", "ExportFormat", "ExportResult", "export_run"]

log = logging.getLogger("transferlab")


@dataclass(frozen=True)
class ExportFormat:
    extension: str
    export: Callable[..., dict[str, Any]]  # (module, example, path, *, dynamic_batch, opset) -> sidecar fields
    load: Callable[..., Callable[[np.ndarray], np.ndarray]]  # (path, threads=None) -> batch -> logits


FORMATS: dict[str, ExportFormat] = {
    "onnx": ExportFormat(".onnx", export_onnx, load_onnx),
    "torchscript": ExportFormat(".pt", export_torchscript, load_torchscript),
}


@dataclass
class ExportResult:
    path: Path
    sidecar: Path
    format: str
    parity: dict[str, Any]
    metadata: dict[str, Any]
    seconds: float


class HalfPrecision(nn.Module):
    """fp16 weights and arithmetic behind fp32 input and output: callers keep feeding what the sidecar's
    preprocessing produces, and get logits they can softmax without overflow worries."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.half()).float()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def default_export_path(run_dir: Path, fmt: str, fp16: bool) -> Path:
    return run_dir / "export" / f"model{'-fp16' if fp16 else ''}{FORMATS[fmt].extension}"


def export_run(run: str | Path, fmt: str = "onnx", *, out: str | Path | None = None, dynamic_batch: bool = True,
               fp16: bool = False, opset: int = DEFAULT_OPSET, parity_count: int = 8) -> ExportResult:
    """Export a run (directory or model.safetensors) to `fmt`; raises ParityError if the file disagrees
    with the PyTorch model beyond tolerance (see ``parity.py``), leaving nothing under `out`."""
    start = time.perf_counter()
    if fmt not in FORMATS:
        raise TransferlabError(f"Unknown export format '{fmt}': choose one of {', '.join(FORMATS)}.")
    spec = FORMATS[fmt]
    _runtime.setup_torch()
    run = Path(run)
    model, meta = load_run_model(run)
    run_dir = run if run.is_dir() else run.parent
    _, weights = model_files(run)
    path = Path(out) if out is not None else default_export_path(run_dir, fmt, fp16)
    if path.suffix.lower() != spec.extension:
        raise TransferlabError(f"A {fmt} export is written to a '{spec.extension}' file, got '{path.name}' "
                               f"(predict and serve tell formats apart by the extension).")
    ensure_writable_dir(path.parent)
    preprocessing = Preprocessing.from_dict(meta["preprocessing"])
    size = preprocessing.input_size
    task, thresholds = task_of(meta)
    precision = "fp16" if fp16 else "fp32"
    # the graph divides by the run's temperature, so its logits are calibrated for every consumer; the
    # parity reference is the same tempered model, so the check covers T too
    temperature = temperature_of(meta)
    model = Tempered(model, temperature).eval()
    module = HalfPrecision(copy.deepcopy(model)).eval() if fp16 else model
    # A dynamic graph is traced at batch 2, so no size-1 broadcast can be mistaken for the batch size.
    example = torch.zeros(2 if dynamic_batch else 1, 3, size, size)

    tmp = path.with_name(f".{path.name}.tmp")
    try:
        extra = spec.export(module, example, tmp, dynamic_batch=dynamic_batch, opset=opset)
        images, source = parity_images(run_dir, list(meta["classes"]), parity_count)
        parity = check_parity(model, preprocessing, spec.load(tmp), images, precision=precision,
                              dynamic_batch=dynamic_batch, thresholds=thresholds)
        parity["source"] = source
        if not parity["passed"]:
            raise ParityError(
                f"the {fmt} export does not reproduce the PyTorch model: max |Δ probability| "
                f"{parity['max_abs_diff']:.2e} (tolerance {parity['tolerance']:.0e}), top-1 identical on "
                f"{parity['top1_identical']}/{parity['images']} images ({source}). Nothing was written; "
                "please report this with the backbone name and `transferlab export -v` output.")
        sidecar_path(path).unlink(missing_ok=True)  # never leave an old sidecar beside a new model
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

    classes = list(meta["classes"])
    batch = None if dynamic_batch else 1
    metadata: dict[str, Any] = {
        "format": SIDECAR_FORMAT,
        "runtime": fmt,
        "model_file": path.name,
        "precision": precision,
        "classes": classes,
        "num_classes": len(classes),
        "input": {"name": INPUT_NAME, "shape": [batch, 3, size, size], "dtype": "float32", "layout": "NCHW",
                  "colour": "RGB", "values": "pixel / 255, then (value - mean) / std per channel"},
        "output": {"name": OUTPUT_NAME, "shape": [batch, len(classes)],
                   "meaning": "logits: softmax over axis 1 gives the probabilities of `classes`, in order"
                   if thresholds is None else "logits: a sigmoid of each gives the probability of that class "
                   "(multi-label); an image has every class whose probability is at least its `thresholds` entry",
                   "temperature": temperature},
        # T (already applied inside the graph) and the val scores `predict --unknown/--sets` derive from
        **({"calibration": meta["calibration"]} if "calibration" in meta else {}),
        "task": task,
        **({} if thresholds is None else {"thresholds": thresholds, "label_sep": meta.get("label_sep")}),
        "preprocessing": preprocessing.to_dict(),
        "dynamic_batch": dynamic_batch,
        **extra,
        "parity": parity,
        "source": {"run": str(run_dir.resolve()), "backbone": meta["backbone"]["name"],
                   "weights": weights.name, "weights_sha256": _sha256(weights)},
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "transferlab_version": __version__,
    }
    atomic_write_json(sidecar_path(path), metadata)
    os.chmod(sidecar_path(path), path.stat().st_mode & 0o777)  # deployable as the model is (temp files are 0600)
    return ExportResult(path=path, sidecar=sidecar_path(path), format=fmt, parity=parity, metadata=metadata,
                        seconds=time.perf_counter() - start)
