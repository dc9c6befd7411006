"""One interface for every model `predict` and `serve` can use: a run directory (or its
model.safetensors) through PyTorch, or an exported ``.onnx`` through onnxruntime alone.

The ONNX path imports neither torch nor the training code: its preprocessing is ``preprocess.py``
(PIL + numpy) driven by the export sidecar, so a deployment needs only onnxruntime, numpy and Pillow.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from transferlab.data.multilabel import MULTILABEL, SINGLE, is_multilabel_model, model_thresholds
from transferlab.errors import RunDirError
from transferlab.export.preprocess import preprocess_image
from transferlab.export.sidecar import read_sidecar
from transferlab.run_dir import model_files

__all__ = [
    "OnnxPredictor",
    "Predictor",
    "TorchPredictor",
    "inference_threads",
    "load_predictor",
    "model_calibration",
    "model_kind",
    "sigmoid",
    "softmax",
    "task_of",
]


class Predictor(Protocol):
    """A classifier ready for inference. `prepare` is thread-safe; `probabilities` is not assumed to be."""

    name: str  # the model file or run, for messages and /health
    runtime: str  # "pytorch" | "onnxruntime"
    classes: list[str]
    input_size: int
    calibration: dict[str, Any] | None  # model.json's / the sidecar's: T and the val scores abstain.py uses
    task: str  # "single" (softmax over classes) | "multilabel" (one sigmoid per class)
    thresholds: list[float] | None  # multilabel: each class's decision threshold (model.json / sidecar)

    def prepare(self, image: Image.Image) -> Any:
        """One decoded RGB image → the model's input for it (C, H, W)."""

    def probabilities(self, batch: Sequence[Any]) -> np.ndarray:
        """Prepared images → (N, classes) float32 probabilities (softmax rows, or multi-label sigmoids)."""

    def explainer(self, method: str = "gradcam") -> Any:
        """Class-activation maps of this model (an evaluation.explain.CamExplainer), or a clear error."""


def inference_threads() -> int:
    """Threads for inference: TRANSFERLAB_THREADS (as ``_runtime.setup_torch`` reads it), else physical cores."""
    import os

    from transferlab._runtime import physical_cores

    return int(os.environ.get("TRANSFERLAB_THREADS") or 0) or physical_cores()


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float32) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Per-label probabilities of a multi-label model's logits (no overflow for large |logit|)."""
    x = logits.astype(np.float32)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def task_of(meta: dict) -> tuple[str, list[float] | None]:
    """(task, thresholds) of a model.json or sidecar: thresholds for multi-label models only."""
    if is_multilabel_model(meta):
        return MULTILABEL, model_thresholds(meta)
    return SINGLE, None


class TorchPredictor:
    """A trained run through PyTorch eager, with the run's own torchvision eval transform."""

    runtime = "pytorch"

    def __init__(self, path: str | Path) -> None:
        import torch

        from transferlab import _runtime
        from transferlab.data.transforms import Preprocessing, eval_transform
        from transferlab.evaluation.calibration import temperature_of
        from transferlab.evaluation.predict import load_inference_model

        _runtime.setup_torch()
        model, meta = load_inference_model(path)
        # channels-last: oneDNN's depthwise and 1x1 convolutions are faster so (Lite0, 224 px, one thread:
        # 276 → 217 ms CPU per batch of 8).
        self.model = model.to(memory_format=torch.channels_last)
        self.name = str(path)
        self.classes = list(meta["classes"])
        self.calibration = meta.get("calibration")
        self._inverse_temperature = 1.0 / temperature_of(meta)  # 1 for a multi-label model (not scaled)
        self.task, self.thresholds = task_of(meta)
        self.preprocessing = Preprocessing.from_dict(meta["preprocessing"])
        self.input_size = self.preprocessing.input_size
        self._transform = eval_transform(self.preprocessing)

    def prepare(self, image: Image.Image) -> Any:
        return self._transform(image)

    def probabilities(self, batch: Sequence[Any]) -> np.ndarray:
        import torch

        x = torch.stack(list(batch)).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            logits = self.model(x).float()
            if self.task == MULTILABEL:
                return logits.sigmoid().numpy()
            return (logits * self._inverse_temperature).softmax(dim=1).numpy()

    def explainer(self, method: str = "gradcam"):
        """A CamExplainer (evaluation.explain) of this model: class-activation maps need its gradients."""
        from transferlab.evaluation.explain import CamExplainer

        return CamExplainer(self.model, self.preprocessing, self.classes, method)


class OnnxPredictor:
    """An exported ``.onnx`` through onnxruntime; a fixed-batch export is fed in chunks of its size."""

    runtime = "onnxruntime"

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise RunDirError(f"ONNX model '{path}' does not exist.")
        meta = read_sidecar(path)
        if meta["runtime"] != "onnx":
            raise RunDirError(f"{path} is described as a {meta['runtime']} export in its sidecar, not ONNX.")
        self.name = str(path)
        self.classes = list(meta["classes"])
        self.calibration = meta.get("calibration")  # its temperature is inside the graph already
        self.task, self.thresholds = task_of(meta)
        self._preprocessing = meta["preprocessing"]
        self.input_size = int(self._preprocessing["input_size"])
        self._input_name = meta["input"]["name"]
        self._dtype = meta["input"].get("dtype", "float32")
        self.max_batch: int | None = meta["input"]["shape"][0]
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or inference_threads()
        options.log_severity_level = 3  # warnings about unused initialisers etc. are not the user's business
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors for unreadable models
            raise RunDirError(f"onnxruntime cannot load {path}: {exc}") from exc

    def prepare(self, image: Image.Image) -> np.ndarray:
        return preprocess_image(image, self._preprocessing, self._dtype)

    def explainer(self, method: str = "gradcam"):
        raise RunDirError(f"{self.name} is an ONNX model: class-activation maps need the gradients of the PyTorch "
                          "model. Explain with the run directory it was exported from.")

    def probabilities(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        x = np.stack(batch)
        step = self.max_batch or len(x)
        chunks = []
        for start in range(0, len(x), step):
            chunk = x[start:start + step]
            n = len(chunk)
            if n < step:  # a fixed-batch graph takes exactly `step` images: pad, then drop the padding
                chunk = np.concatenate([chunk, np.zeros((step - n, *chunk.shape[1:]), chunk.dtype)])
            chunks.append(self.session.run(None, {self._input_name: chunk})[0][:n])
        logits = np.concatenate(chunks)
        return sigmoid(logits) if self.task == MULTILABEL else softmax(logits)


def model_kind(path: str | Path) -> str:
    """"run" (a run directory or its model.safetensors) or "onnx"; anything else is a clear error."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return "onnx"
    if path.is_dir() or path.suffix.lower() == ".safetensors":
        return "run"
    if not path.exists():
        raise RunDirError(f"Model '{path}' does not exist.")
    try:  # a pickle checkpoint deserves the security explanation, not just "unsupported"
        from transferlab.io import refuse_pickle
    except ImportError:  # an ONNX-only install without torch
        pass
    else:
        refuse_pickle(path)
    raise RunDirError(f"'{path}' is not a model transferlab can predict with: give a run directory, its "
                      "model.safetensors, or an exported .onnx (`transferlab export RUN`).")


_LOADERS: dict[str, Callable[[Path], Predictor]] = {"run": TorchPredictor, "onnx": OnnxPredictor}


def model_calibration(path: str | Path) -> dict[str, Any] | None:
    """The calibration entry of a model's metadata (model.json, or an export's sidecar) without loading
    the model; None when it has none (trained before calibration existed)."""
    path = Path(path)
    if model_kind(path) == "onnx":
        return read_sidecar(path).get("calibration")
    from transferlab.io import read_json  # imports torch: not for the torch-free ONNX path

    meta_path, _ = model_files(path)
    if not meta_path.is_file():
        raise RunDirError(f"'{path}' holds no trained model (model.json + model.safetensors).")
    meta = read_json(meta_path)
    return meta.get("calibration") if isinstance(meta, dict) else None


def load_predictor(path: str | Path) -> Predictor:
    """The predictor for a run directory, a model.safetensors or an exported .onnx."""
    return _LOADERS[model_kind(path)](Path(path))
