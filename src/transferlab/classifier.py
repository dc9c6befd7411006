"""A trained model as one object: ``clf = transferlab.load(path)``, then ``clf.predict(...)``.

`path` is a run directory, its ``model.safetensors`` or an exported ``.onnx``; the object is the same
either way (`runtime` says which), and an ONNX model loads with onnxruntime alone — torch is never
imported for it. Predictions are typed (:class:`Prediction`), in input order, and a file that cannot be
used gives a prediction with its ``error`` instead of stopping the others, as `transferlab predict`.

    import transferlab
    clf = transferlab.load("runs/ants")
    p = clf.predict("bee.jpg")            # one input → one Prediction
    p.label, p.probability, p.top_k      # 'bees', 0.97, (Candidate('bees', 0.97), Candidate('ants', 0.03))
    clf.predict(["a.jpg", "photos/"])     # several (files, folders, globs, PIL images) → a list
    p = clf.predict("odd.jpg", unknown="auto", sets=0.9)
    p.label, p.abstained, p.candidates, p.set  # 'unknown', True, (Candidate('bees', 0.55), ...), ('bees', 'ants')
    clf.model                            # the torch.nn.Module (an .onnx: its onnxruntime.InferenceSession)
    e = clf.explain("bee.jpg", out_dir="cams/")  # Explanation: label, heatmap (HxW in [0, 1]), overlay, path

A multi-label model (``clf.task == "multilabel"``, trained on a path,labels CSV) answers with every label
at or above its tuned threshold: ``p.labels`` (Candidates, most probable first), ``p.label_set``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from transferlab.data.images import ImageError, load_image
from transferlab.errors import TransferlabError
from transferlab.evaluation.abstain import DEFAULT_TARGET_PRECISION, UNKNOWN, Abstainer, AbstainOptions
from transferlab.export.limits import PREDICT_BATCH, TOP_K

if TYPE_CHECKING:
    import onnxruntime
    import torch

    from transferlab.evaluation.evaluate import EvalResult
    from transferlab.export.exporter import ExportResult
    from transferlab.export.predictors import Predictor

__all__ = ["Candidate", "Classifier", "Explanation", "Prediction", "load"]


@dataclass(frozen=True)
class Candidate:
    """One label and its probability."""

    label: str
    probability: float


@dataclass(frozen=True)
class Prediction:
    """What the classifier says of one input: the most probable label, then the top k (most probable
    first). `source` is the file's path (None for in-memory images); `error` says why a file could not
    be used, and then `label` is None and `top_k` empty.

    With ``unknown=...``, an input below the threshold has ``abstained`` True, `label` "unknown" and
    `probability` None; its `candidates` (= `top_k`) are kept (``abstained`` is None without ``unknown``). With ``sets=...``, `set` is its conformal
    prediction set (labels, most probable first). `labels`: a multi-label model's answer, every label at or
    above its threshold, most probable first (possibly none); None for single-label models."""

    label: str | None
    probability: float | None
    top_k: tuple[Candidate, ...]
    source: str | None = None
    error: str | None = None
    abstained: bool | None = None
    set: tuple[str, ...] | None = None
    labels: tuple[Candidate, ...] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def candidates(self) -> tuple[Candidate, ...]:
        """The top k labels, whether the prediction abstained or not."""
        return self.top_k

    @property
    def label_set(self) -> frozenset[str]:
        """The labels the model gives the input: a multi-label model's `labels`, else {`label`}."""
        if self.labels is not None:
            return frozenset(c.label for c in self.labels)
        return frozenset() if self.label is None else frozenset({self.label})

    def to_dict(self) -> dict[str, Any]:
        """The `transferlab predict --json` shape: {"path", "predictions": [{"label", "probability"}]} or
        {"path", "error"}; a multi-label model's adds "labels" (same items) before "predictions"; plus
        "label" and "abstained" with --unknown, "set" with --sets."""
        if self.error is not None:
            return {"path": self.source, "error": self.error}
        out: dict[str, Any] = {"path": self.source}
        if self.labels is not None:
            out["labels"] = [{"label": c.label, "probability": c.probability} for c in self.labels]
        out["predictions"] = [{"label": c.label, "probability": c.probability} for c in self.top_k]
        if self.abstained is not None:
            out.update(label=self.label, abstained=self.abstained)
        if self.set is not None:
            out["set"] = list(self.set)
        return out

    @classmethod
    def from_entry(cls, entry: dict[str, Any]) -> Prediction:
        """From one entry of export.batch.iter_predictions."""
        if "error" in entry:
            return cls(None, None, (), source=entry["path"], error=entry["error"])
        top = tuple(Candidate(p["label"], p["probability"]) for p in entry["predictions"])
        abstained = entry.get("abstained")
        label = UNKNOWN if abstained else top[0].label
        found = entry.get("set")
        labels = (None if "labels" not in entry
                  else tuple(Candidate(p["label"], p["probability"]) for p in entry["labels"]))
        return cls(label, None if abstained else top[0].probability, top, source=entry["path"],
                   abstained=abstained, set=None if found is None else tuple(found), labels=labels)


@dataclass(frozen=True)
class Explanation:
    """Where the model found the evidence for its prediction of one input (Grad-CAM, see
    evaluation/explain.py). `heatmap` is (S, S) float32 in [0, 1] over the S-px view the model saw (resized
    and cropped as evaluated); `overlay` is that view with the map blended on and the label drawn; `path`
    is the PNG written when an `out_dir` was given. `error` says why an input could not be explained."""

    label: str | None
    probability: float | None
    heatmap: np.ndarray | None
    overlay: Image.Image | None
    source: str | None = None
    path: Path | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Classifier:
    """A trained classifier ready for inference; build it with :func:`load`."""

    def __init__(self, predictor: Predictor, path: Path) -> None:
        self._predictor = predictor
        self.path = path

    @property
    def classes(self) -> list[str]:
        return list(self._predictor.classes)

    @property
    def task(self) -> str:
        """"single" (softmax: one label per image) or "multilabel" (a sigmoid per label, cut at `thresholds`)."""
        return getattr(self._predictor, "task", "single")

    @property
    def thresholds(self) -> dict[str, float] | None:
        """A multi-label model's decision threshold per label (tuned on val when trained); None otherwise."""
        values = getattr(self._predictor, "thresholds", None)
        return None if values is None else dict(zip(self.classes, values))

    @property
    def runtime(self) -> str:
        """"pytorch" (a run) or "onnxruntime" (an exported .onnx)."""
        return self._predictor.runtime

    @property
    def input_size(self) -> int:
        return self._predictor.input_size

    @property
    def transform(self) -> Callable[[Image.Image], Any]:
        """The eval preprocessing: an RGB PIL image → the model's input (a tensor for a run, an array for
        ONNX), exactly as training validated."""
        return self._predictor.prepare

    @property
    def model(self) -> torch.nn.Module | onnxruntime.InferenceSession:
        """The network. For a run: a plain ``torch.nn.Module`` (eval mode, BatchNorm folded into the
        convolutions, channels-last), taking `transform`'s outputs stacked into a batch and returning logits
        (before the run's calibration: `probabilities` is the softmax of these divided by `temperature`).
        For an exported ``.onnx``: its ``onnxruntime.InferenceSession`` (torch is not imported for it)."""
        model = getattr(self._predictor, "model", None)
        if model is None:
            model = getattr(self._predictor, "session", None)
        if model is None:
            raise TransferlabError(f"{self.path} is run by {self.runtime}; it has no model object to hand out. "
                                   "Load the run directory it was exported from for the torch module.")
        return model

    def predict(self, inputs: Any, *, top_k: int = TOP_K, batch_size: int = PREDICT_BATCH,
                unknown: str | float | None = None, target_precision: float = DEFAULT_TARGET_PRECISION,
                sets: float | None = None) -> Prediction | list[Prediction]:
        """Predict one input (an image file, a PIL image, an HxWx3 uint8 array) → a Prediction, or many (a
        list or tuple of those, a folder, a glob) → a list in input order. A file or glob that yields
        nothing usable gives a Prediction with its `error`; the others go on.

        `unknown`: "auto" (the val threshold whose answers reach `target_precision`) or a probability:
        below it the Prediction is "unknown" (``abstained``). `sets`: a coverage such as 0.9 for each
        Prediction's conformal `set` (see evaluation/abstain.py)."""
        if top_k < 1:
            raise TransferlabError("top_k must be at least 1")
        abstainer = self.abstainer(unknown, target_precision, sets)
        single = _is_single(inputs)
        items = [inputs] if single or isinstance(inputs, (str, Path)) else list(inputs)
        results = list(self._predict_items(items, top_k=top_k, batch_size=batch_size, abstainer=abstainer))
        return results[0] if single else results

    def abstainer(self, unknown: str | float | None = None, target_precision: float = DEFAULT_TARGET_PRECISION,
                  sets: float | None = None) -> Abstainer | None:
        """The threshold and conformal quantile `predict` would apply (with the val coverage and precision
        of the threshold); None when neither is asked for."""
        return Abstainer.build(AbstainOptions(unknown, target_precision, sets), self.calibration, str(self.path))

    @property
    def calibration(self) -> dict[str, Any] | None:
        """model.json's (or the sidecar's) calibration entry: temperature, val log loss/ECE before and
        after, val scores; None for a model trained before calibration existed (T = 1)."""
        return getattr(self._predictor, "calibration", None)

    @property
    def temperature(self) -> float:
        """T of temperature scaling (1.0: uncalibrated); already inside an exported ONNX graph's logits."""
        return float((self.calibration or {}).get("temperature", 1.0))

    def probabilities(self, images: Sequence[Image.Image | np.ndarray]) -> np.ndarray:
        """In-memory images → (N, classes) float32 probabilities, columns in `classes` order."""
        if not images:
            return np.zeros((0, len(self.classes)), np.float32)
        return self._predictor.probabilities([self._predictor.prepare(_as_image(x)) for x in images])

    def _predict_items(self, items: list[Any], *, top_k: int, batch_size: int,
                       abstainer: Abstainer | None = None) -> Iterator[Prediction]:
        """Files/folders/globs stream through export.batch (decoded ahead, constant memory); in-memory
        images are scored in batches of their own; the order of `items` is kept."""
        from transferlab.export.batch import iter_predictions, label_entry

        k = min(top_k, len(self.classes))
        run: list[Any] = []  # consecutive items of one kind, flushed when the kind changes
        for item in [*items, _END]:
            if run and (item is _END or _is_path(item) != _is_path(run[0])):
                if _is_path(run[0]):
                    entries = iter_predictions(self._predictor, run, top_k=top_k, batch_size=batch_size,
                                               abstainer=abstainer)
                    yield from (Prediction.from_entry(e) for e in entries)
                else:
                    for start in range(0, len(run), batch_size):
                        chunk = run[start:start + batch_size]
                        for row in self.probabilities(chunk):
                            entry = {"path": None, **label_entry(self._predictor, row, k)}
                            if abstainer is not None:
                                abstainer.annotate(entry, row, self.classes)
                            yield Prediction.from_entry(entry)
                run = []
            if item is not _END:
                run.append(item)

    def explain(self, inputs: Any, out_dir: str | Path | None = None, *, method: str = "gradcam",
                batch_size: int = 8) -> Explanation | list[Explanation]:
        """Class-activation maps of the predicted class: inputs as `predict` takes them → an Explanation, or a
        list in input order. With `out_dir`, each overlay is also written there as
        ``<stem>.<label>.<percent>pct.png``. Needs a run (gradients): an ONNX model is a clear error."""
        from transferlab.evaluation.explain import check_method, overlay_file_name, overlay_folder, render_overlay
        from transferlab.evaluation.predict import expand_inputs

        if batch_size < 1:
            raise TransferlabError("batch_size must be at least 1")
        self._run_path("explain")  # an ONNX model has no gradients: refused before anything is made
        check_method(method)
        folder = overlay_folder(out_dir) if out_dir is not None else None
        explainer = self._predictor.explainer(method)
        single = _is_single(inputs)
        items = [inputs] if single or isinstance(inputs, (str, Path)) else list(inputs)
        results: list[Explanation] = []
        taken: set[str] = set()
        todo: list[tuple[str | None, Any]] = []  # (source, uint8 view) waiting for a batch

        def flush() -> None:
            if not todo:
                return
            maps, probs = explainer.heatmaps([view for _, view in todo])
            for (source, view), heatmap, row in zip(todo, maps, probs):
                best = int(row.argmax())
                label, p = self.classes[best], float(row[best])
                overlay = render_overlay(view, heatmap, f"{label} {p:.2f}")
                path = None
                if folder is not None:
                    path = folder / overlay_file_name(source, label, p, taken)
                    overlay.save(path)
                results.append(Explanation(label, p, heatmap, overlay, source, path))
            todo.clear()

        for item in items:
            pairs = expand_inputs([item]) if _is_path(item) else [(None, None)]
            for path, error in pairs:
                source = None if path is None else str(path)
                try:
                    if error is not None:
                        raise TransferlabError(error)
                    todo.append((source, explainer.view(_as_image(item) if path is None else load_image(path))))
                except (TransferlabError, ImageError, OSError) as exc:
                    flush()  # keep input order: what is waiting goes first
                    results.append(Explanation(None, None, None, None, source, error=str(getattr(exc, "reason", exc))))
                    continue
                if len(todo) >= batch_size:
                    flush()
        flush()
        return results[0] if single else results

    def evaluate(self, data: str | Path | None = None, **options: Any) -> EvalResult:
        """Metrics on the run's own val split, or on labelled `data` (transferlab.evaluate's options)."""
        return evaluate_run_dir(self._run_path("evaluate"), data, **options)

    def export(self, format: str = "onnx", *, out: str | Path | None = None, dynamic_batch: bool = True,
               fp16: bool = False, opset: int | None = None, parity_images: int = 8) -> ExportResult:
        """Export to ONNX or TorchScript with its sidecar and parity check (transferlab.export_model's
        options); load the file again with `transferlab.load`."""
        from transferlab.export.exporter import export_run
        from transferlab.export.onnx import DEFAULT_OPSET

        return export_run(self._run_path("export"), format, out=out, dynamic_batch=dynamic_batch, fp16=fp16,
                          opset=opset or DEFAULT_OPSET, parity_count=parity_images)

    def _run_path(self, verb: str) -> Path:
        if self.runtime != "pytorch":
            raise TransferlabError(f"{verb} needs the run directory; {self.path} is an exported ONNX model.")
        return self.path

    def __repr__(self) -> str:
        task = f", task={self.task!r}" if self.task != "single" else ""
        return (f"Classifier({str(self.path)!r}, runtime={self.runtime!r}, classes={len(self.classes)}, "
                f"input_size={self.input_size}{task})")


_END = object()


def _is_path(item: Any) -> bool:
    return isinstance(item, (str, Path))


def _is_single(inputs: Any) -> bool:
    """One image: a PIL image, an image array, or a path that is neither a folder nor a glob (a missing
    file is one input, whose Prediction says so)."""
    if isinstance(inputs, (Image.Image, np.ndarray)):
        return True
    return _is_path(inputs) and not Path(inputs).is_dir() and not any(ch in str(inputs) for ch in "*?[")


def _as_image(item: Any) -> Image.Image:
    """A PIL image or an HxW / HxWx3 / HxWx4 uint8 array → RGB, as a decoded file would be."""
    from transferlab.data.images import as_rgb

    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim not in (2, 3) or (item.ndim == 3 and item.shape[2] not in (3, 4)):
            raise TransferlabError(f"an image array must be HxW or HxWx3/4 uint8, got {item.dtype} {item.shape}; "
                                   "pass model inputs to `classifier.model` instead")
        item = Image.fromarray(item)
    if not isinstance(item, Image.Image):
        raise TransferlabError(f"cannot predict a {type(item).__name__}: give image files, folders, globs, PIL "
                               "images or uint8 arrays")
    return as_rgb(item)


def evaluate_run_dir(run: str | Path, data: str | Path | None = None, *, plots: bool = True,
                     **options: Any) -> EvalResult:
    """evaluation.evaluate_run (options: split, tta, top_losses, batch_size, progress), then its plots in
    <run>/eval-<name>/ unless `plots` is False: what `transferlab evaluate` and Classifier.evaluate do."""
    from transferlab.evaluation.evaluate import evaluate_run
    from transferlab.reporting.plots import eval_plots  # matplotlib: imported only when evaluating

    result = evaluate_run(run, data, **options)
    if plots:
        result.plots = eval_plots(result.to_dict(), result.run_dir / f"eval-{result.name}")
    return result


def load(path: str | Path) -> Classifier:
    """The classifier in a run directory, its model.safetensors, or an exported .onnx (onnxruntime only:
    torch is not imported). Errors (no such file, no trained model, a pickle) are clear TransferlabErrors."""
    from transferlab.export.predictors import load_predictor

    path = Path(path)
    return Classifier(load_predictor(path), path)
