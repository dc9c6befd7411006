"""Score a trained run on labelled data: one EvalResult (metrics, probabilities, interpretation) that
the CLI prints and the report renders, saved as ``eval-<name>.json`` in the run directory.

    result = evaluate_run("runs/ants")                           # the run's own val split
    result = evaluate_run("runs/ants", "new_photos/", tta=True)  # any labelled folder or CSV

Images go through the run's own eval transform (model.json's preprocessing) in full precision; an
image that cannot be decoded is skipped and listed, never fatal. Probabilities are calibrated with the
run's temperature (``calibration.py``, as predict and exports apply it); ``metrics["calibration"]`` keeps
ECE, log loss and the reliability bins before it, ``metrics["selective"]`` the risk-coverage curve and
what ``predict --unknown auto`` and ``--sets`` achieve on this data (``abstain.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
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
from transferlab.evaluation.abstain import selective_metrics
from transferlab.evaluation.calibration import calibration_record, scaled_softmax, temperature_of
from transferlab.evaluation.interpret import interpret
from transferlab.evaluation.metrics import classification_metrics
from transferlab.evaluation.multilabel_metrics import multilabel_metrics, worst_images
from transferlab.evaluation.predict import load_inference_model
from transferlab.evaluation.samples import eval_data
from transferlab.evaluation.tta import TTA_VIEWS, tta_logits
from transferlab.io import atomic_write_json, read_json
from transferlab.logs import progress_bar
from transferlab.run_dir import model_files
from transferlab.training.memory import AdaptiveBatch, forward_in_passes

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
    probabilities: np.ndarray  # (N, C), plain (no TTA); single-label: calibrated with the run's temperature
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
    logits: np.ndarray | None = None  # (N, C) raw model outputs, before the temperature

    @property
    def accuracy(self) -> float:
        """Top-1 accuracy; multi-label: subset accuracy (every label of the image right)."""
        return self.metrics["accuracy"]

    @property
    def temperature(self) -> float:
        """The softmax temperature applied (1 for a multi-label model, which is not temperature-scaled)."""
        return self.metrics.get("calibration", {}).get("temperature", 1.0)

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
    calibrate: bool | None = None,
) -> EvalResult:
    """Evaluate a run on its own `split` (as in training) or on `data`; writes eval-<name>.json into
    `out_dir` (default: the run directory).

    `calibrate` (the run's own val split only): True fits the temperature on these logits, False
    resets it to 1; either way model.json's calibration entry (T and the val scores predict's
    ``--unknown``/``--sets`` use) is rewritten from this evaluation. None uses the stored one.

    `decoded`: the images (and val views) a training run kept in memory; the report that ends
    ``train`` passes them, so the val images are not decoded and resized once more (in-process)."""
    _runtime.setup_torch()
    start = time.perf_counter()
    if calibrate is not None and (data is not None or split != "val"):
        raise TransferlabError("--calibrate fits the temperature on the run's own val split: drop DATA and "
                               "--split (calibrating on the data you evaluate on would flatter it).")
    model, meta = load_inference_model(run_dir)
    meta_path, _ = model_files(run_dir)
    run_dir = Path(run_dir) if Path(run_dir).is_dir() else Path(run_dir).parent
    classes = list(meta["classes"])
    multi = is_multilabel_model(meta)
    if multi and tta:
        raise TransferlabError("--tta averages softmax views of single-label models; this model is multi-label "
                               "(sigmoid outputs): evaluate it without --tta.")
    if multi and calibrate:
        raise TransferlabError("--calibrate fits a softmax temperature, for single-label models; this model is "
                               "multi-label: its per-label thresholds were tuned on val instead.")
    temperature = 1.0 if multi else temperature_of(meta)
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
    passes = AdaptiveBatch("evaluation")
    skipped = list(chosen.skipped)
    with progress_bar(progress, "evaluating", len(chosen.samples)) as advance:
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
                    views = tta_logits(model, x).cpu()
                    averaged.append(views)
                    plain.append(views[0])
                else:  # out of memory halves the pass, as in training (training/memory.py)
                    plain.append(torch.cat(forward_in_passes(model, x, passes)))
                kept.extend(offset + i for i in ok)
            offset += len(reasons)
            advance(len(reasons))
    model.to("cpu")
    if not kept:
        raise DataError(f"None of the {len(chosen.samples)} images in {chosen.source} could be read "
                        f"(e.g. {skipped[-1]['path']}: {skipped[-1]['reason']}).")

    logits = torch.cat(plain).double().numpy()
    paths = [str(chosen.samples[i].path) for i in kept]
    tta_probs = None
    if multi:
        targets = label_targets([chosen.samples[i] for i in kept], len(classes), True).numpy().astype(np.int64)
        probs = torch.from_numpy(logits).sigmoid().numpy()
        metrics = multilabel_metrics(probs, targets, classes, thresholds)
        interpretation = {"top_losses": worst_images(probs, targets, paths, classes, thresholds, top_losses)}
    else:
        targets = np.array([chosen.samples[i].label for i in kept], dtype=np.int64)
        calibration = meta.get("calibration")
        if calibrate is not None:
            calibration = _store_calibration(meta_path, meta,
                                             calibration_record(logits, targets, classes, fit=calibrate))
            temperature = calibration["temperature"]
        probs = scaled_softmax(logits, temperature)
        metrics = classification_metrics(probs, targets, classes)
        raw = classification_metrics(scaled_softmax(logits, 1.0), targets, classes) if temperature != 1.0 else metrics
        metrics["calibration"] = {"temperature": temperature, "log_loss_before": raw["log_loss"],
                                  "ece_before": raw["ece"], "reliability_before": raw["reliability"]}
        metrics["selective"] = selective_metrics(probs, targets, calibration)
        if tta:
            views = torch.cat(averaged, dim=1).double().numpy()
            tta_probs = np.mean([scaled_softmax(v, temperature) for v in views], axis=0)
        # of the plain model: what `predict` and an exported model will do
        interpretation = interpret(probs, targets, paths, classes, metrics["confusion_matrix"], top_losses)
    result = EvalResult(
        run_dir=run_dir, name=chosen.name, split=chosen.split, data=chosen.source, classes=classes,
        metrics=metrics, probabilities=probs, targets=targets, paths=paths,
        interpretation=interpretation,
        tta_metrics=classification_metrics(tta_probs, targets, classes) if tta_probs is not None else None,
        tta_probabilities=tta_probs, skipped=skipped, warnings=chosen.warnings,
        seconds=time.perf_counter() - start, logits=logits,
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


def _store_calibration(meta_path: Path, meta: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """Rewrite model.json with `record` as its calibration entry (the file is the run's commit point,
    written atomically; every other key is kept as read)."""
    atomic_write_json(meta_path, {**meta, "calibration": record})
    log.info("calibration: T = %.4f (val log loss %.4f -> %.4f, ECE %.4f -> %.4f)", record["temperature"],
             record["val_log_loss"]["before"], record["val_log_loss"]["after"], record["val_ece"]["before"],
             record["val_ece"]["after"])
    if "note" in record:
        log.info("calibration: %s", record["note"])
    return record
