"""The Python API — the CLI is a thin skin over these functions.

    import transferlab
    result = transferlab.train("data/", epochs_finetune=4, out="runs/ants")
    print(result.val_accuracy_best, result.run_dir)
    transferlab.predict(result.run_dir, ["img.jpg"], top_k=3)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transferlab.config import TrainConfig
from transferlab.errors import TransferlabError

if TYPE_CHECKING:  # the heavy stack (torch, Lightning) loads only when a command needs it
    from transferlab.evaluation.evaluate import EvalResult
    from transferlab.training.run import TrainResult

# The demo: the embedded default backbone on a real dataset that an installed package ships
# (scikit-learn's 1 797 handwritten digits, upsampled). 96 px keeps it well inside 5 minutes on
# 2 CPU cores; fine-tuning adds to the ≈0.96 a linear probe on frozen features reaches.
DEMO_OVERRIDES: dict[str, Any] = {
    "img_size": 96,
    "epochs_frozen": 16,
    "epochs_finetune": 3,
    "lr_finetune": 1e-3,
    "augment": "light",
}


def train(data: str | Path | None = None, *, resume: str | Path | None = None, **options: Any) -> TrainResult:
    """Train a classifier on `data` (ImageFolder tree, class folders, or CSV). `options` are
    TrainConfig fields (backbone, head, epochs_frozen, lr_decay, ...); `resume` continues a run."""
    from transferlab.training.run import train as _train

    if resume is not None:
        return _train(TrainConfig(), resume=resume)
    if data is None:
        raise TransferlabError("train needs a data path (a folder of images or a CSV file)")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(options) - known
    if unknown:
        raise TransferlabError(f"Unknown training option(s): {', '.join(sorted(unknown))}")
    cfg = TrainConfig(data=str(data), **options)
    return _train(cfg)


def predict(run: str | Path, inputs: Iterable[str | Path], *, top_k: int = 3) -> list[dict]:
    """Top-k predictions for images, folders or globs, using a trained run directory."""
    from transferlab.evaluation.predict import predict as _predict

    return _predict(run, inputs, top_k=top_k)


def list_models(search: str | None = None, *, offline_only: bool = False) -> list[dict]:
    """Backbones that can be used (timm, torchvision, offline-shipped) and whether they work offline."""
    from transferlab.models.registry import list_backbones

    return list_backbones(search, offline_only=offline_only)


def demo(out: str | Path | None = None, **overrides: Any) -> TrainResult:
    """The main job on the embedded default: EfficientNet-Lite0 (offline weights) on the digits."""
    from transferlab.data.digits import materialize_digits

    data = materialize_digits()
    options = {**DEMO_OVERRIDES, **overrides}
    return train(data, out=str(out) if out else None, **options)


def evaluate(
    run: str | Path,
    data: str | Path | None = None,
    *,
    split: str = "val",
    tta: bool = False,
    top_losses: int = 16,
    batch_size: int = 64,
    plots: bool = True,
    progress: bool = True,
) -> EvalResult:
    """Metrics and interpretation of a run on its own `split` (as in training) or on labelled `data`.
    Writes <run>/eval-<name>.json and, with `plots`, PNGs in <run>/eval-<name>/; returns an EvalResult."""
    from transferlab.evaluation.evaluate import evaluate_run
    from transferlab.reporting.plots import eval_plots

    result = evaluate_run(run, data, split=split, tta=tta, top_losses=top_losses, batch_size=batch_size,
                          progress=progress)
    if plots:
        result.plots = eval_plots(result.to_dict(), result.run_dir / f"eval-{result.name}")
    return result


def report(runs: str | Path | Iterable[str | Path], out: str | Path | None = None, *, progress: bool = True) -> Path:
    """One self-contained HTML page for one run or comparing several; evaluates runs not yet evaluated.
    Default output: <run>/report.html for one run, ./report.html for several."""
    from transferlab.reporting.html import write_report

    run_dirs = [runs] if isinstance(runs, (str, Path)) else list(runs)
    return write_report(run_dirs, out, progress=progress)
