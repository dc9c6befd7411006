"""Predict with a trained run: images, folders or globs → top-k labels with probabilities.

The model is rebuilt from model.json (architecture, head, classes, preprocessing) and its weights
come only from model.safetensors — nothing is unpickled. Unreadable files get an "error" entry and
never stop the batch.
"""

from __future__ import annotations

import glob
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from transferlab import _runtime
from transferlab.data.images import IMAGE_EXTENSIONS, ImageError, load_image
from transferlab.data.transforms import Preprocessing, eval_transform
from transferlab.errors import RunDirError, TransferlabError
from transferlab.models.heads import HeadConfig, build_classifier
from transferlab.models.registry import BackboneSpec
from transferlab.training.io import load_tensors, read_json


def load_run_model(run: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model in eval mode, model.json metadata) from a run directory."""
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


@torch.no_grad()
def predict(run: str | Path, inputs: Iterable[str | Path], *, top_k: int = 3, batch_size: int = 32) -> list[dict]:
    """[{"path", "predictions": [{"label", "probability"}...]} or {"path", "error"}] in input order."""
    _runtime.setup_torch()
    model, meta = load_run_model(run)
    if top_k < 1:
        raise TransferlabError("--top-k must be at least 1")
    classes = meta["classes"]
    k = min(top_k, len(classes))
    transform = eval_transform(Preprocessing.from_dict(meta["preprocessing"]))
    results: list[dict] = []
    pending: list[tuple[int, torch.Tensor]] = []

    def flush() -> None:
        if not pending:
            return
        batch = torch.stack([t for _, t in pending])
        probs = model(batch).float().softmax(dim=1)
        values, indices = probs.topk(k, dim=1)
        for (slot, _), v, i in zip(pending, values.tolist(), indices.tolist()):
            results[slot]["predictions"] = [
                {"label": classes[c], "probability": round(float(p), 6)} for p, c in zip(v, i)
            ]
        pending.clear()

    for path, error in expand_inputs(inputs):
        entry: dict[str, Any] = {"path": str(path)}
        results.append(entry)
        if error is not None:
            entry["error"] = error
            continue
        try:
            tensor = transform(load_image(path))
        except ImageError as exc:
            entry["error"] = exc.reason if hasattr(exc, "reason") else str(exc)
            continue
        pending.append((len(results) - 1, tensor))
        if len(pending) >= batch_size:
            flush()
    flush()
    return results
