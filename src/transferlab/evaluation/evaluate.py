"""Score a trained run on labelled data: one EvalResult (metrics, probabilities, interpretation) that
the CLI prints and the report renders, saved as ``eval-<name>.json`` in the run directory.

    result = evaluate_run("runs/ants")                           # the run's own val split
    result = evaluate_run("runs/ants", "new_photos/", tta=True)  # any labelled folder or CSV

Images go through the run's own eval transform (model.json's preprocessing) in full precision; an
image that cannot be decoded is skipped and listed, never fatal.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from transferlab import _runtime
from transferlab.data.datasets import DecodedImages, label_targets
from transferlab.data.images import ImageError, load_image
from transferlab.data.multilabel import is_multilabel_model, model_thresholds
from transferlab.data.sources import Sample
from transferlab.data.threaded import threaded_batches
from transferlab.data.transforms import Preprocessing, eval_transform, eval_view
from transferlab.errors import DataError, TransferlabError
from transferlab.evaluation.interpret import interpret
from transferlab.evaluation.metrics import classification_metrics
from transferlab.evaluation.multilabel_metrics import multilabel_metrics, worst_images
from transferlab.evaluation.predict import load_inference_model
from transferlab.evaluation.samples import eval_data
from transferlab.evaluation.tta import TTA_VIEWS, tta_probabilities
from transferlab.training.io import atomic_write_json, read_json

__all__ = ["EVAL_FORMAT", "EvalResult", "eval_json_paths", "evaluate_run", "load_eval"]

log = logging.getLogger("transferlab")

EVAL_FORMAT = "transferlab.eval/1"


@dataclass
class EvalResult:
    """Everything one evaluation produced. ``to_dict()`` is the JSON form (without the per-image
    probabilities, which can be large); the report renders that form."""

    run_dir: Path
    name: str  # eval-<name>.json
    split: str
    data: str
    classes: list[str]
    metrics: dict[str, Any]
    probabilities: np.ndarray  # (N, C), plain (no TTA)
    targets: np.ndarray  # (N,) class indices; multi-label: (N, C) 0/1
    paths: list[str]
    interpretation: dict[str, Any]
    tta_metrics: dict[str, Any] | None = None
    tta_probabilities: np.ndarray | None = None
    skipped: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    json_path: Path | None = None
    plots: dict[str, Path] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        """Top-1 accuracy; multi-label: subset accuracy (every label of the image right)."""
        return self.metrics["accuracy"]

    @property
    def multilabel(self) -> bool:
        return self.metrics.get("task") == "multilabel"

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": EVAL_FORMAT,
            "run_dir": str(self.run_dir),
            "name": self.name,
            "split": self.split,
            "data": self.data,
            "classes": list(self.classes),
            "metrics": self.metrics,
            "tta": None if self.tta_metrics is None else {"views": list(TTA_VIEWS), "metrics": self.tta_metrics},
            "interpretation": self.interpretation,
            "skipped": self.skipped,
            "warnings": self.warnings,
            "seconds": round(self.seconds, 3),
        }


def eval_json_paths(run_dir: Path) -> list[Path]:
    """The run's saved evaluations, the val split first."""
    found = sorted(Path(run_dir).glob("eval-*.json"))
    return sorted(found, key=lambda p: p.name != "eval-val.json")


def load_eval(path: Path) -> dict[str, Any]:
    """A saved evaluation (the ``to_dict()`` form)."""
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != EVAL_FORMAT:
        raise TransferlabError(f"{path} is not a transferlab evaluation ({EVAL_FORMAT}); re-run `transferlab evaluate`.")
    return data


class _Images(Dataset):
    """(tensor, reason) per sample; reason is "" when the image decoded, else why it did not.
    With `decoded` (a training run's images, see ``run``), eval views kept there are reused."""

    def __init__(self, samples: list[Sample], pre: Preprocessing, decoded: DecodedImages | None = None) -> None:
        self.samples, self.transform, self.size = samples, eval_transform(pre), pre.input_size
        self.decoded, self.view = decoded, eval_view(pre) if decoded is not None else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        path = self.samples[i].path
        try:
            if self.decoded is not None:
                return self.decoded.view(path, self.view), ""
            return self.transform(load_image(path)), ""
        except ImageError as exc:
            return torch.zeros(3, self.size, self.size), exc.reason


@torch.no_grad()
def evaluate_run(
    run_dir: str | Path,
    data: str | Path | None = None,
    *,
    split: str = "val",
    tta: bool = False,
    batch_size: int = 64,
    top_losses: int = 16,
    device: str = "auto",
    num_workers: int | None = None,
    progress: bool = True,
    decoded: DecodedImages | None = None,
    out_dir: str | Path | None = None,
) -> EvalResult:
    """Evaluate a run on its own `split` (as in training) or on `data`; writes eval-<name>.json into
    `out_dir` (default: the run directory).

    `decoded`: the images (and val views) a training run kept in memory; the report that ends
    ``train`` passes them, so the val images are not decoded and resized once more (in-process)."""
    _runtime.setup_torch()
    start = time.perf_counter()
    model, meta = load_inference_model(run_dir)
    run_dir = Path(run_dir) if Path(run_dir).is_dir() else Path(run_dir).parent
    classes = list(meta["classes"])
    multi = is_multilabel_model(meta)
    if multi and tta:
        raise TransferlabError("--tta averages softmax views of single-label models; this model is multi-label "
                               "(sigmoid outputs): evaluate it without --tta.")
    thresholds = model_thresholds(meta) if multi else None
    chosen = eval_data(run_dir, classes, data, split, progress=progress,
                       label_sep=(meta.get("label_sep") or ";") if multi else None)
    pre = Preprocessing.from_dict(meta["preprocessing"])
    if batch_size < 1:
        raise TransferlabError("--batch-size must be at least 1")
    if num_workers is None:
        num_workers = _runtime.default_num_workers()
    if decoded is not None:
        num_workers = 0  # the images are in this process's memory
    accelerator = _runtime.resolve_accelerator(device)
    # channels-last as fine-tuning's validation, predict and serve run it (Lite0 fp32 at 288 px on
    # this 2-core CPU: 18.1 -> 25.8 img/s)
    model.to(accelerator, memory_format=torch.channels_last)
    images = _Images(chosen.samples, pre, decoded)
    loader: Iterable[tuple[torch.Tensor, list[str]]]
    if num_workers == 0:  # decoded on threads beside the forward pass (the eval transform is deterministic)
        loader = threaded_batches(images, batch_size, _runtime.decode_threads())
    else:
        loader = DataLoader(images, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    plain, averaged, kept = [], [], []
    skipped = list(chosen.skipped)
    with _progress_bar(len(chosen.samples), enabled=progress) as advance:
        offset = 0
        for batch, reasons in loader:
            ok = [i for i, r in enumerate(reasons) if not r]
            for i, reason in enumerate(reasons):
                if reason:
                    path = str(chosen.samples[offset + i].path)
                    log.warning("skipped %s: %s", path, reason)
                    skipped.append({"path": path, "reason": reason})
            if ok:
                x = batch[ok].to(accelerator).contiguous(memory_format=torch.channels_last)
                if tta:
                    p, q = tta_probabilities(model, x)
                    averaged.append(q.cpu())
                else:
                    p = model(x).float()
                    p = p.sigmoid() if multi else p.softmax(dim=1)
                plain.append(p.cpu())
                kept.extend(offset + i for i in ok)
            offset += len(reasons)
            advance(len(reasons))
    model.to("cpu")
    if not kept:
        raise DataError(f"None of the {len(chosen.samples)} images in {chosen.source} could be read "
                        f"(e.g. {skipped[-1]['path']}: {skipped[-1]['reason']}).")

    probs = torch.cat(plain).double().numpy()
    paths = [str(chosen.samples[i].path) for i in kept]
    if multi:
        targets = label_targets([chosen.samples[i] for i in kept], len(classes), True).numpy().astype(np.int64)
        metrics = multilabel_metrics(probs, targets, classes, thresholds)
        interpretation = {"top_losses": worst_images(probs, targets, paths, classes, thresholds, top_losses)}
    else:
        targets = np.array([chosen.samples[i].label for i in kept], dtype=np.int64)
        metrics = classification_metrics(probs, targets, classes)
        # of the plain model: what `predict` and an exported model will do
        interpretation = interpret(probs, targets, paths, classes, metrics["confusion_matrix"], top_losses)
    tta_probs = torch.cat(averaged).double().numpy() if tta else None
    result = EvalResult(
        run_dir=run_dir, name=chosen.name, split=chosen.split, data=chosen.source, classes=classes,
        metrics=metrics, probabilities=probs, targets=targets, paths=paths,
        interpretation=interpretation,
        tta_metrics=classification_metrics(tta_probs, targets, classes) if tta_probs is not None else None,
        tta_probabilities=tta_probs, skipped=skipped, warnings=chosen.warnings,
        seconds=time.perf_counter() - start,
    )
    result.json_path = Path(out_dir or run_dir) / f"eval-{chosen.name}.json"
    atomic_write_json(result.json_path, result.to_dict())
    if multi:
        log.info("%s: mAP %.4f, micro F1 %.4f, subset accuracy %.4f on %d images (%d skipped) -> %s", chosen.name,
                 metrics["map"], metrics["micro"]["f1"], metrics["subset_accuracy"], len(kept), len(skipped),
                 result.json_path)
    else:
        log.info("%s: accuracy %.4f on %d images (%d skipped) -> %s", chosen.name, metrics["accuracy"],
                 len(kept), len(skipped), result.json_path)
    return result


@contextmanager
def _progress_bar(total: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A transient rich bar on stderr; yields advance(n). Disabled: a no-op."""
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("[bold]evaluating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("eval", total=total)
        yield lambda n: bar.advance(task, n)
