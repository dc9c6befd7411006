"""Multi-label data: a CSV's label cells holding several labels (``cat;dog``), read, checked and split.

Pure Python (no torch): what ``data/sources.py`` needs to read a ``path,labels`` CSV whose cells list
several labels, and what ``train`` needs to decide the task before any work starts:

    task = resolve_task("auto", "data.csv", label_sep=None)   # "multilabel" when any row has several labels

A sample then carries every label it has (``Sample.labels``); the targets are multi-hot vectors
(``data.datasets.label_targets``), the head has one sigmoid per label.
"""

from __future__ import annotations

import csv
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from transferlab.errors import DataError

__all__ = ["DEFAULT_THRESHOLD", "LABEL_COLUMNS", "LABEL_SEPARATORS", "MIN_POSITIVES", "MULTILABEL", "SINGLE", "TASKS",
           "check_rule", "check_task", "detect_separator", "few_positives", "holdout_split", "is_multilabel_model", "label_column",
           "model_thresholds", "read_label_cells", "refuse_multilabel", "resolve_task", "split_cell"]

TASKS = ("auto", "single", "multilabel")
SINGLE, MULTILABEL = "single", "multilabel"
# Tried in this order when --label-sep is not given: neither occurs in the usual label names.
LABEL_SEPARATORS = (";", "|")
LABEL_COLUMNS = ("label", "labels")  # a CSV's label column: either name
# A label with fewer training positives than this is reported: its threshold, tuned on a handful of val
# positives, and its AP are noise.
MIN_POSITIVES = 5
DEFAULT_THRESHOLD = 0.5  # the sigmoid's midpoint: a label's threshold before (or without) tuning on val


def label_column(columns: dict[str, str]) -> str | None:
    """The header name of a CSV's label column (`columns`: lower-cased name -> name as written), or None."""
    return next((columns[name] for name in LABEL_COLUMNS if name in columns), None)


def read_label_cells(csv_path: Path) -> list[str]:
    """Every non-empty label cell of a CSV (no file is opened but the CSV; errors are DataErrors)."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = {name.strip().lower(): name for name in reader.fieldnames or [] if name}
            column = label_column(columns)
            if column is None or "path" not in columns:
                return []  # load_splits says what the header lacks
            return [cell.strip() for row in reader if (cell := row.get(column) or "").strip()]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"Cannot read {csv_path} ({exc}). Save it as a UTF-8 CSV with a path,labels header.") from exc


def detect_separator(cells: Iterable[str]) -> str | None:
    """The separator the label cells use (the first of LABEL_SEPARATORS found in any cell), or None when
    every cell holds one label. Cells using both ';' and '|' are ambiguous: pass --label-sep."""
    seen = {sep for cell in cells for sep in LABEL_SEPARATORS if sep in cell}
    if len(seen) > 1:
        raise DataError(f"The label cells use both {' and '.join(repr(s) for s in LABEL_SEPARATORS)}: pass "
                        "--label-sep to say which one separates labels.")
    return next(iter(seen), None)


def split_cell(cell: str, sep: str) -> tuple[str, ...]:
    """The labels of one cell, stripped, without empties or repeats, sorted (one spelling per set)."""
    return tuple(sorted({part.strip() for part in cell.split(sep) if part.strip()}))


def check_task(task: str, label_sep: str | None) -> None:
    if task not in TASKS:
        raise DataError(f"--task '{task}' is not one of {', '.join(TASKS)}.")
    if label_sep is not None and (len(label_sep) != 1 or label_sep in ",\"\n\r" or label_sep.isalnum()):
        raise DataError(f"--label-sep must be one character that is not a letter, digit, comma or quote "
                        f"(e.g. ';' or '|'), got {label_sep!r}.")
    if label_sep is not None and task == SINGLE:
        raise DataError("--label-sep splits several labels per image: it needs --task multilabel (or auto).")


def check_rule(rule: str) -> str | None:
    """Why `rule` is not a threshold rule (None when it is): 'f1' or 'precision:P' with 0 < P <= 1."""
    if rule == "f1":
        return None
    kind, _, value = rule.partition(":")
    try:
        target = float(value)
    except ValueError:
        target = -1.0
    if kind != "precision" or not 0.0 < target <= 1.0:
        return f"thresholds '{rule}' is not 'f1' or 'precision:P' with P in (0, 1], e.g. precision:0.9"
    return None


def resolve_task(task: str, data: str | Path, label_sep: str | None = None) -> tuple[str, str | None]:
    """(task, separator) a run trains with: 'single' or 'multilabel' and, for multilabel, the separator.
    'auto' is multilabel when `data` is a CSV and any label cell holds several labels. Reads the CSV's
    cells only (no image), so `train` decides before any work; a folder layout is single-label."""
    check_task(task, label_sep)
    path = Path(data).expanduser()
    is_csv = path.is_file() and path.suffix.lower() == ".csv"
    if task == SINGLE:
        return SINGLE, None
    if not is_csv:
        if task == MULTILABEL:
            raise DataError(f"--task multilabel reads a CSV with a path,labels header (labels separated by "
                            f"';' or '|'); {path} is not a CSV file.")
        return SINGLE, None
    cells = read_label_cells(path)
    sep = label_sep if label_sep is not None else detect_separator(cells)
    several = sep is not None and any(len(split_cell(cell, sep)) > 1 for cell in cells)
    if task == "auto":
        return (MULTILABEL, sep) if several else (SINGLE, None)
    return MULTILABEL, sep or LABEL_SEPARATORS[0]


def holdout_split(train: Sequence[tuple[Path, tuple[str, ...]]], val_split: float, seed: int,
                  warnings: list[str]) -> tuple[list, list]:
    """Hold out ``val_split`` of the images, stratified by each image's rarest label (the usual cheap
    stand-in for iterative stratification): every label with two or more images keeps at least one in
    train and, where it can, one in val. Seeded per key, like the single-label split."""
    frequency = Counter(label for _, labels in train for label in labels)
    by_key: dict[str, list[tuple[Path, tuple[str, ...]]]] = {}
    for path, labels in train:
        rarest = min(labels, key=lambda name: (frequency[name], name))
        by_key.setdefault(rarest, []).append((path, labels))
    kept, held = [], []
    for key, items in sorted(by_key.items()):
        if len(items) < 2:
            kept.extend(items)
            continue
        n_val = min(len(items) - 1, max(1, int(len(items) * val_split + 0.5)))
        order = sorted(items)
        random.Random(f"{seed}/{key}").shuffle(order)
        held.extend(sorted(order[:n_val]))
        kept.extend(sorted(order[n_val:]))
    missing = sorted(set(frequency) - {label for _, labels in held for label in labels})
    if missing:
        listed = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        warnings.append(f"label(s) with no validation image: {listed}; their thresholds stay at 0.5 and their AP "
                        "is not measured")
    return kept, held


def few_positives(train: Iterable[tuple[Path, tuple[str, ...]]], minimum: int = MIN_POSITIVES) -> list[str]:
    """A warning naming the labels with fewer than `minimum` training images (empty when none)."""
    counts = Counter(label for _, labels in train for label in labels)
    few = sorted((n, name) for name, n in counts.items() if n < minimum)
    if not few:
        return []
    listed = ", ".join(f"{name} ({n})" for n, name in few[:10]) + (" ..." if len(few) > 10 else "")
    return [(f"{len(few)} label(s) have fewer than {minimum} training images: {listed}; their thresholds and "
             "AP rest on very few examples, add images of them")]


def is_multilabel_model(meta: dict) -> bool:
    """Whether a model.json (or an export sidecar) describes a multi-label model (sigmoid outputs)."""
    return meta.get("task") == MULTILABEL


def model_thresholds(meta: dict) -> list[float]:
    """A multi-label model's per-label thresholds (model.json's `thresholds`, in `classes` order), 0.5
    where none were tuned; a list of the wrong length or values outside (0, 1] is a DataError."""
    n = len(meta.get("classes") or [])
    values = meta.get("thresholds")
    if values is None:
        return [DEFAULT_THRESHOLD] * n
    if (not isinstance(values, list) or len(values) != n
            or not all(isinstance(v, int | float) and not isinstance(v, bool) and 0 < v <= 1 for v in values)):
        raise DataError(f"The model's thresholds must be {n} numbers in (0, 1], one per class; got {values!r}. "
                        "Retrain, or fix model.json's thresholds.")
    return [float(v) for v in values]


def refuse_multilabel(data: str | Path, verb: str) -> None:
    """DataError when `data` is a multi-label CSV: `verb` (select, doctor, lr-find) scores single-label
    data only, and would otherwise read each label combination ('cat;dog') as a class of its own."""
    path = Path(data).expanduser()
    if not (path.is_file() and path.suffix.lower() == ".csv"):
        return
    cells = read_label_cells(path)
    try:
        sep = detect_separator(cells)
    except DataError:
        sep = LABEL_SEPARATORS[0]
    if sep is not None and any(len(split_cell(cell, sep)) > 1 for cell in cells):
        raise DataError(f"{path} lists several labels per image (multi-label); `transferlab {verb}` handles "
                        "single-label data only. Train it with `transferlab train` (the task is detected), "
                        "or give a CSV with one label per row.")
