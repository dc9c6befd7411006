"""Prediction over many images in constant memory: decode ahead on threads, score in batches, yield
results in input order, write CSV/JSON as they come.

At most ``batch_size`` prepared images plus a small decode window are alive at any time, however
many files a folder holds; a file that cannot be used gets an ``error`` entry and the run goes on.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from transferlab.data.images import ImageError, load_image
from transferlab.errors import TransferlabError
from transferlab.evaluation.abstain import Abstainer
from transferlab.evaluation.predict import expand_inputs
from transferlab.export.limits import PREDICT_BATCH, TOP_K
from transferlab.export.predictors import Predictor

__all__ = ["OUTPUT_FORMATS", "count_inputs", "iter_predictions", "labels_above", "top_k_labels", "write_predictions"]

DECODE_THREADS = 2  # PIL decodes and resizes without the GIL: this overlaps decoding with inference


def top_k_labels(probabilities: np.ndarray, classes: Sequence[str], k: int) -> list[dict[str, Any]]:
    """The k most probable labels of one image, most probable first."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [{"label": classes[i], "probability": round(float(probabilities[i]), 6)} for i in order]


def labels_above(probabilities: np.ndarray, classes: Sequence[str], thresholds: Sequence[float]) -> list[dict[str, Any]]:
    """A multi-label image's labels: every class at or above its threshold, most probable first."""
    chosen = [i for i in np.argsort(-probabilities, kind="stable") if probabilities[i] >= thresholds[i]]
    return [{"label": classes[i], "probability": round(float(probabilities[i]), 6)} for i in chosen]


def label_entry(predictor: Predictor, probabilities: np.ndarray, k: int) -> dict[str, Any]:
    """What one image's entry says: {"predictions": top k} and, for a multi-label model, {"labels": every
    label at or above its threshold} first (the decision; `predictions` ranks them all)."""
    entry: dict[str, Any] = {}
    # a Predictor written before tasks existed (or a stand-in) has no `task`: it is single-label
    if getattr(predictor, "task", "single") == "multilabel":
        entry["labels"] = labels_above(probabilities, predictor.classes, predictor.thresholds)
    entry["predictions"] = top_k_labels(probabilities, predictor.classes, k)
    return entry


def count_inputs(inputs: Iterable[str | Path]) -> int:
    """How many entries `iter_predictions` will yield (for a progress bar), without keeping the paths."""
    return sum(1 for _ in expand_inputs(inputs))


def _prepare(predictor: Predictor, path: Path) -> Any:
    return predictor.prepare(load_image(path))


def _decoded(predictor: Predictor, inputs: Iterable[str | Path], window: int
             ) -> Iterator[tuple[dict[str, Any], Any]]:
    """(entry, prepared image or None) in input order; decoding runs up to `window` files ahead."""
    pending: deque[tuple[dict[str, Any], Future | None]] = deque()

    def finish(entry: dict[str, Any], future: Future | None) -> tuple[dict[str, Any], Any]:
        if future is None:
            return entry, None
        try:
            return entry, future.result()
        except ImageError as exc:
            entry["error"] = exc.reason
        except (OSError, ValueError) as exc:  # e.g. a file deleted or changed between listing and reading
            entry["error"] = f"unreadable file: {exc}"
        return entry, None

    with ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="transferlab-decode") as pool:
        for path, error in expand_inputs(inputs):
            entry: dict[str, Any] = {"path": str(path)}
            if error is not None:
                entry["error"] = error
            pending.append((entry, None if error else pool.submit(_prepare, predictor, path)))
            if len(pending) >= window:
                yield finish(*pending.popleft())
        while pending:
            yield finish(*pending.popleft())


def iter_predictions(predictor: Predictor, inputs: Iterable[str | Path], *, top_k: int = TOP_K,
                     batch_size: int = PREDICT_BATCH, abstainer: Abstainer | None = None) -> Iterator[dict[str, Any]]:
    """{"path", "predictions": [{"label", "probability"}, ...]} or {"path", "error"} per input, in order;
    with an `abstainer`, entries also get "label" and "abstained" (--unknown) and "set" (--sets)."""
    if top_k < 1:
        raise TransferlabError("--top-k must be at least 1")
    if batch_size < 1:
        raise TransferlabError("--batch-size must be at least 1")
    k = min(top_k, len(predictor.classes))
    held: list[dict[str, Any]] = []  # entries not yet yielded, in order
    batch: list[tuple[dict[str, Any], Any]] = []

    def flush() -> Iterator[dict[str, Any]]:
        if batch:
            probs = predictor.probabilities([x for _, x in batch])
            for (entry, _), row in zip(batch, probs):
                entry.update(label_entry(predictor, row, k))
                if abstainer is not None:
                    abstainer.annotate(entry, row, predictor.classes)
            batch.clear()
        yield from held
        held.clear()

    for entry, prepared in _decoded(predictor, inputs, window=batch_size + 2 * DECODE_THREADS):
        held.append(entry)
        if prepared is not None:
            batch.append((entry, prepared))
        if len(batch) >= batch_size or len(held) >= 4 * batch_size:
            yield from flush()
    yield from flush()


# --- output files ------------------------------------------------------------------------------------


class _CsvOut:
    """path, label_1, probability_1, ..., label_k, probability_k, error; then `decisions` (e.g. "label"
    and "abstained" for --unknown, "set" for --sets: its labels joined by "|"; a multi-label model's
    "labels": those above their thresholds, joined by ";")."""

    def __init__(self, handle: io.TextIOBase, k: int, decisions: Sequence[str] = ()) -> None:
        self.k, self.writer, self.decisions = k, csv.writer(handle), list(decisions)
        self.writer.writerow(["path", *(f"{c}_{i}" for i in range(1, k + 1) for c in ("label", "probability")),
                              "error", *self.decisions])

    def write(self, entry: dict[str, Any]) -> None:
        cells: list[Any] = []
        for p in entry.get("predictions", [])[:self.k]:
            cells += [p["label"], p["probability"]]
        cells += [""] * (2 * self.k - len(cells))
        extra = [_cell(entry.get(name, "")) for name in self.decisions]
        self.writer.writerow([entry["path"], *cells, entry.get("error", ""), *extra])

    def close(self) -> None:
        pass


def _cell(value: Any) -> Any:
    """A decision field as one CSV cell: a multi-label answer's labels joined by ";", a set's by "|"."""
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return ";".join(item["label"] for item in value)
    return "|".join(value) if isinstance(value, list) else value


class _JsonOut:
    """The list `transferlab predict --json` prints, one entry per line, written as it comes."""

    def __init__(self, handle: io.TextIOBase, k: int, decisions: Sequence[str] = ()) -> None:
        self.handle, self.separator = handle, "\n  "
        handle.write("[")

    def write(self, entry: dict[str, Any]) -> None:
        self.handle.write(self.separator + json.dumps(entry, ensure_ascii=False))
        self.separator = ",\n  "

    def close(self) -> None:
        self.handle.write("]\n" if self.separator == "\n  " else "\n]\n")


OUTPUT_FORMATS: dict[str, type[_CsvOut | _JsonOut]] = {".csv": _CsvOut, ".json": _JsonOut}
"""Output file suffix → writer class (handle, top-k columns)."""


def write_predictions(results: Iterable[dict[str, Any]], out: str | Path, *, top_k: int,
                      on_entry: Callable[[dict[str, Any]], None] | None = None,
                      decisions: Sequence[str] = ()) -> dict[str, int]:
    """Stream `results` into `out` (.csv or .json) and return {"images", "failed"}; `decisions`: the
    entries' decision fields (a multi-label model's "labels", the abstainer's) that a CSV gets columns for.

    Rows go to a hidden ``.partial`` file renamed over `out` at the end: an interrupted run never
    leaves a truncated file under the real name.
    """
    out = Path(out)
    make_writer = OUTPUT_FORMATS.get(out.suffix.lower())
    if make_writer is None:
        raise TransferlabError(f"--out must end in {' or '.join(OUTPUT_FORMATS)}, got '{out.name}'.")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TransferlabError(f"Cannot create the folder for {out}: {exc.strerror or exc}") from exc
    partial = out.with_name(f".{out.name}.partial")
    counts = {"images": 0, "failed": 0}
    try:
        with open(partial, "w", encoding="utf-8", newline="") as handle:
            writer = make_writer(handle, top_k, decisions)
            for entry in results:
                writer.write(entry)
                counts["images"] += 1
                counts["failed"] += "error" in entry
                if on_entry is not None:
                    on_entry(entry)
            writer.close()
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, out)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise TransferlabError(f"Cannot write {out}: {exc.strerror or exc}") from exc
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return counts
