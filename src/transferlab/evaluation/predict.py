"""Predict with a trained run: images, folders or globs → top-k labels with probabilities.

The model is rebuilt from model.json (architecture, head, classes, preprocessing) and its weights
come only from model.safetensors — nothing is unpickled. Unreadable files get an "error" entry and
never stop the batch. Batches stream through ``export.batch`` (shared with ONNX models), and torch
loads only inside ``load_run_model``: this module is imported on the torch-free ONNX path too.
"""

from __future__ import annotations

import glob
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transferlab.data.images import IMAGE_EXTENSIONS
from transferlab.errors import RunDirError

if TYPE_CHECKING:
    import torch


def load_run_model(run: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model in eval mode, model.json metadata) from a run directory."""
    from transferlab.models.heads import HeadConfig, build_classifier
    from transferlab.models.registry import BackboneSpec
    from transferlab.training.io import load_tensors, read_json

    run = Path(run)
    if not run.exists():
        raise RunDirError(f"Run directory '{run}' does not exist.")
    meta_path = run / "model.json" if run.is_dir() else run.with_suffix(".json")
    weights_path = run / "model.safetensors" if run.is_dir() else run
    if not meta_path.exists() or not weights_path.exists():
        raise RunDirError(
            f"'{run}' holds no trained model (model.json + model.safetensors). "
            "Train one with `transferlab train DATA --out DIR`, or --resume an interrupted run."
        )
    meta = read_json(meta_path)
    spec = BackboneSpec.from_dict(meta["backbone"])
    model = build_classifier(spec, meta["num_classes"], HeadConfig.from_dict(meta["head"]), load_weights=False)
    state = load_tensors(weights_path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RunDirError(
            f"{weights_path} does not match its model.json ({len(missing)} missing, {len(unexpected)} unexpected "
            "tensors); the run directory is inconsistent."
        )
    model.eval()
    return model, meta


def load_inference_model(run: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """`load_run_model` for paths that only infer (evaluate, predict, serve): BatchNorm folded into the
    convolutions before it (models/fold_bn.py: same outputs to ~1e-6, Lite0 fp32 2.2x faster on a CPU).
    Not for parameter counts or export, which describe the model as trained."""
    from transferlab.models.fold_bn import folded_for_inference

    model, meta = load_run_model(run)
    return folded_for_inference(model, int(meta["preprocessing"]["input_size"])), meta


def expand_inputs(inputs: Iterable[str | Path]) -> Iterator[tuple[Path, str | None]]:
    """Files, folders (recursive, image extensions) and globs → (path, error-or-None), in order."""
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                yield p, "folder holds no images"
            yield from ((f, None) for f in files)
        elif p.is_file():
            yield p, None
        elif any(ch in str(item) for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(str(item), recursive=True) if Path(m).is_file())
            if not matches:
                yield p, "pattern matched no files"
            yield from ((m, None) for m in matches)
        else:
            yield p, "no such file or directory"


def predict(run: str | Path, inputs: Iterable[str | Path], *, top_k: int = 3, batch_size: int = 32) -> list[dict]:
    """[{"path", "predictions": [{"label", "probability"}...]} or {"path", "error"}] in input order.
    `run`: a run directory, its model.safetensors, or an exported .onnx."""
    from transferlab.export.batch import iter_predictions
    from transferlab.export.predictors import load_predictor

    return list(iter_predictions(load_predictor(run), inputs, top_k=top_k, batch_size=batch_size))
