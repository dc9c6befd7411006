"""Turn what the user points at (a folder or a CSV) into validated train/val/test samples.

Three layouts are accepted:

* ``train/`` + ``val/`` (or ``valid/``, ``validation/``) + optional ``test/`` folders, each
  holding one sub-folder per class (torchvision ImageFolder style);
* a folder holding one sub-folder per class, split into train/val here (stratified, seeded);
* a CSV file with a ``path,label`` header and an optional ``split`` column; with ``task="multilabel"``
  a ``path,labels`` CSV whose cells list several labels (``cat;dog``, see ``data/multilabel.py``).

Bad files never abort loading: they are listed in ``DataSplits.skipped`` with a reason.
Anything that makes the data unusable as a whole raises :class:`DataError` saying what to do.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import random
import stat
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transferlab.data import multilabel
from transferlab.data.images import (
    IMAGE_EXTENSIONS,
    ImageError,
    file_digest,
    has_image_extension,
    looks_like_image,
    probe_image,
    unreadable_reason,
    unsupported_format,
)
from transferlab.data.splits import SPLIT_ALIASES, SPLITS
from transferlab.errors import DataError
from transferlab.logs import tracked
from transferlab.paths import is_hidden

__all__ = [
    "LAYOUT_CLASS_FOLDERS",
    "LAYOUT_CSV",
    "LAYOUT_SHARDS",
    "LAYOUT_SPLIT_FOLDERS",
    "DataSplits",
    "Sample",
    "exact_duplicate_groups",
    "load_splits",
]

logger = logging.getLogger("transferlab")

LAYOUT_SPLIT_FOLDERS = "train/val folders"
LAYOUT_CLASS_FOLDERS = "class folders + val split"
LAYOUT_CSV = "csv"
LAYOUT_SHARDS = "webdataset shards"

_MAX_DUPLICATE_WARNINGS = 20
_MAX_WORKERS = 4

_HOW_TO_LAYOUT: dict[str, str] = {
    LAYOUT_SPLIT_FOLDERS: "put each class's images in train/<class>/ and val/<class>/",
    LAYOUT_CLASS_FOLDERS: "put each class's images in its own sub-folder (cat/*.jpg, dog/*.jpg)",
    LAYOUT_CSV: "list images of at least two labels, one path,label row per image",
    LAYOUT_SHARDS: "write KEY.jpg with a KEY.cls or KEY.json label per image, at least two labels "
    "(`transferlab shards DATA OUT` writes them)",
}
_HOW_TO_FILL_VAL: dict[str, str] = {
    LAYOUT_SPLIT_FOLDERS: "add images to val/<class>/, or remove val/ to split train/ for you",
    LAYOUT_CLASS_FOLDERS: "add images: a class needs at least 2 images to contribute to validation",
    LAYOUT_CSV: "mark some rows with split=val, or drop the split column to split automatically",
    LAYOUT_SHARDS: "add images to the val/ shards, or remove val/ to split train/ for you",
}


@dataclass(frozen=True)
class Sample:
    """One labelled image; ``label`` indexes ``DataSplits.classes``. A multi-label sample lists every
    label it has in ``labels`` (``label`` is the first of them); a single-label one leaves it empty."""

    path: Path
    label: int
    labels: tuple[int, ...] = ()

    @property
    def label_set(self) -> tuple[int, ...]:
        """Every label of the image: ``labels``, or ``(label,)`` for a single-label sample."""
        return self.labels or (self.label,)


MAX_LISTED_SKIPS = 100
"""Skipped files and rows listed one by one (log, ``data.json``, ``summary.json``); the rest are counted."""


class SkipList(list):
    """The skipped files and CSV rows, as ``{"path", "reason"}`` dicts: the first `limit` distinct entries are
    listed, every one is counted (``total``). A CSV of 100 000 rows naming one image then
    costs a hundred log lines and entries, not 400 000 lines and megabytes of JSON."""

    def __init__(self, entries: Iterable[dict[str, str]] = (), limit: int = MAX_LISTED_SKIPS) -> None:
        super().__init__()
        self.limit, self.total = limit, 0
        self._listed: set[tuple[str, str]] = set()
        for entry in entries:
            self.add(entry["path"], entry["reason"])

    def add(self, path: str | Path, reason: str) -> dict[str, str] | None:
        """Count the entry; return it when listed (None: a duplicate, or past the limit)."""
        key = (str(path), reason)
        if key in self._listed:
            return None
        self.total += 1
        if len(self) >= self.limit:
            return None
        self._listed.add(key)
        entry = {"path": key[0], "reason": reason}
        self.append(entry)
        return entry

    @property
    def unlisted(self) -> int:
        return self.total - len(self)

    def summary_line(self) -> str | None:
        """One line for the skips past the limit, or None when every skip is listed."""
        if not self.unlisted:
            return None
        return (f"{self.total} files or rows were skipped in all; only the first {len(self)} are listed "
                f"({self.unlisted} more not listed)")


def _stat_key(path: Path) -> str:
    """'size:mtime_ns' of the file, or of the shard holding a member (`shard.tar/0001.png`); '-' if gone."""
    for candidate in (path, *path.parents):
        try:
            st = os.stat(candidate)
        except OSError:  # NotADirectoryError for a shard member: try its shard
            continue
        return f"{st.st_size}:{st.st_mtime_ns}" if stat.S_ISREG(st.st_mode) else "-"
    return "-"


@dataclass
class DataSplits:
    """The loaded dataset plus everything the user should know about how it was read."""

    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    skipped: list[dict[str, str]]  # {"path": str, "reason": str}: a SkipList, the first MAX_LISTED_SKIPS
    warnings: list[str]
    layout: str  # LAYOUT_SPLIT_FOLDERS | LAYOUT_CLASS_FOLDERS | LAYOUT_CSV
    # SHA-1 of each usable file's bytes, from validation (empty when not validated): exact duplicates
    digests: dict[Path, str] = field(default_factory=dict, repr=False)
    task: str = multilabel.SINGLE  # "single" | "multilabel" (samples carry `labels`)
    label_sep: str | None = None  # multilabel: the character separating a CSV cell's labels

    def __post_init__(self) -> None:
        if not isinstance(self.skipped, SkipList):
            self.skipped = SkipList(self.skipped)

    @property
    def multilabel(self) -> bool:
        return self.task == multilabel.MULTILABEL

    @property
    def skipped_count(self) -> int:
        """Every skipped file and row, listed or not."""
        return self.skipped.total

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per class in each split (split -> class -> count, zeros included); multi-label: the
        images holding each label (its positives)."""
        result: dict[str, dict[str, int]] = {}
        for split in SPLITS:
            per_label = Counter(label for sample in getattr(self, split) for label in sample.label_set)
            result[split] = {name: per_label[i] for i, name in enumerate(self.classes)}
        return result

    def duplicate_groups(self) -> list[list[tuple[str, Sample]]]:
        """Byte-identical files, as groups of (split, sample); none when the data were not validated."""
        return exact_duplicate_groups({split: getattr(self, split) for split in SPLITS}, self.digests)

    def fingerprint(self) -> str:
        """SHA-256 of what a run trains on: the classes, and every sample's split, label, path, size and
        modification time (a shard member counts its shard's). Stat only, so a file edited in place
        keeping its size and mtime goes unnoticed; a file added, removed, moved, relabelled or rewritten
        changes it."""
        digest = hashlib.sha256(json.dumps(self.classes).encode())
        for split in SPLITS:
            for sample in getattr(self, split):
                # a multi-label sample's other labels count too (appended: single-label fingerprints unchanged)
                more = f"\t{sample.labels}" if sample.labels else ""
                digest.update(f"{split}\t{sample.label}{more}\t{sample.path}\t{_stat_key(sample.path)}\n".encode())
        return digest.hexdigest()

    def check_unchanged(self, recorded: dict[str, Any]) -> None:
        """DataError when `recorded` (a run's data.json) has another fingerprint than this data's: resuming
        would continue a run on other data than it began with. Runs from before fingerprints pass."""
        before = recorded.get("fingerprint")
        if before is None or before == self.fingerprint():
            return
        counts = f"{recorded.get('num_train', '?')} train / {recorded.get('num_val', '?')} val images then, " \
                 f"{len(self.train)} / {len(self.val)} now"
        raise DataError(
            f"The data changed since this run started ({counts}; a file was added, removed, moved, relabelled "
            "or rewritten): resuming would continue it on other data. Start a new run with another --out, "
            "or pass --allow-changed-data to resume anyway."
        )

    def drop_unreadable(self) -> list[dict[str, str]]:
        """Files that became unreadable since validation (deleted, permissions changed) are removed from
        every split and listed in ``skipped`` like the files validation rejected; returns the new entries.
        For callers about to read every file again (the feature cache hashes them all): a file gone
        between validation and training is then a skipped file, not a failed run."""
        paths = list(dict.fromkeys(s.path for split in SPLITS for s in getattr(self, split)))
        workers = max(1, min(_MAX_WORKERS, os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            reasons = dict(zip(paths, pool.map(unreadable_reason, paths), strict=True))
        gone = {path: reason for path, reason in reasons.items() if reason is not None}
        entries = []
        for path, reason in gone.items():
            entry = {"path": str(path), "reason": f"{reason} (after validation)"}
            if self.skipped.add(entry["path"], entry["reason"]) is not None:
                logger.warning("Skipping %s: %s", path, entry["reason"])
            entries.append(entry)
        if gone:
            for split in SPLITS:
                setattr(self, split, [s for s in getattr(self, split) if s.path not in gone])
        return entries

    def to_summary(self) -> dict[str, Any]:
        """JSON-ready description, saved with the run and shown by the CLI."""
        return {
            "layout": self.layout,
            "classes": list(self.classes),
            "counts": self.counts(),
            "num_train": len(self.train),
            "num_val": len(self.val),
            "num_test": len(self.test),
            "skipped": [dict(entry) for entry in self.skipped],
            "skipped_count": self.skipped_count,
            "warnings": list(self.warnings),
            "fingerprint": self.fingerprint(),
            "task": self.task,
            **({"label_sep": self.label_sep} if self.multilabel else {}),
        }


@dataclass
class _Found:
    """Candidate files, before validation, as read from one layout."""

    source: Path  # what the user passed (folder or CSV file), named in error messages
    root: Path  # paths in warnings are shown relative to this
    layout: str
    files: dict[
        str, list[tuple[Path, str]]
    ]  # split -> [(path, class name)]; no "val" = split it
    declared: list[str]  # class names declared for training (folders or CSV labels)
    skipped: list[dict[str, str]] = field(default_factory=SkipList)
    warnings: list[str] = field(default_factory=list)
    # multi-label CSV: the separator of a cell's labels; `files` then holds (path, tuple of label names)
    label_sep: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.skipped, SkipList):
            self.skipped = SkipList(self.skipped)

    def skip(self, path: str | Path, reason: str) -> None:
        """Count the skip; log and list it among the first MAX_LISTED_SKIPS (one line says when more follow)."""
        if self.skipped.add(path, reason) is not None:
            logger.warning("Skipping %s: %s", path, reason)
        elif self.skipped.unlisted == 1 and self.skipped.total > self.skipped.limit:
            logger.warning("More files or rows are skipped: only the first %d are listed, the rest counted",
                           self.skipped.limit)


def require_data(data: str | Path, *, or_also: str | None = None) -> None:
    """DataError when `data` (a folder, a CSV or shards) does not exist: what every verb that reads data
    checks first, before a backbone is loaded. `or_also` names one more kind of input the verb takes."""
    from transferlab.data import shards

    if shards.is_shard_source(data) or Path(data).expanduser().exists():
        return
    kinds = "a CSV file with a path,label header" + (f", or {or_also}" if or_also else "")
    raise DataError(f"Data path does not exist: {Path(data).expanduser().absolute()}. Pass a folder of class "
                    f"sub-folders, a folder with train/ and val/ sub-folders, {'' if or_also else 'or '}{kinds}.")


def load_splits(
    data: str | Path,
    *,
    val_split: float = 0.2,
    seed: int = 0,
    validate: bool = True,
    progress: bool = True,
    csv_anywhere: bool = False,
    task: str = multilabel.SINGLE,
    label_sep: str | None = None,
) -> DataSplits:
    """Read a dataset folder or CSV into train/val/test samples.

    ``task``: "single" (one label per image), "multilabel" (a CSV whose cells list labels separated by
    ``label_sep``, default detected) or "auto" (multilabel when a CSV cell holds several labels).

    A CSV's rows may name files below the CSV's own folder only (``../../etc/passwd`` and
    ``/proc/self/environ`` are skipped rows), unless ``csv_anywhere``.

    ``val_split`` is the fraction of each class held out when no validation split is given.
    ``validate`` decodes every image once (bad ones are skipped, not fatal) and looks for
    byte-identical duplicates; turn it off only for large, known-good datasets.
    """
    from transferlab.data import shards

    if shards.is_shard_source(data):
        return _assemble(_read_shards(data), val_split=val_split, seed=seed, validate=validate, progress=progress)
    require_data(data)
    path = Path(data).expanduser().absolute()
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise DataError(
                f"{path} is a file but not a .csv. Pass a folder of class sub-folders or a CSV "
                "file with a path,label header."
            )
        task, label_sep = multilabel.resolve_task(task, path, label_sep)
        found = _read_csv(path, anywhere=csv_anywhere, label_sep=label_sep)
        if found.label_sep is not None:
            return _assemble_multilabel(found, val_split=val_split, seed=seed, validate=validate, progress=progress)
    else:
        multilabel.resolve_task(task, path, label_sep)  # a folder is single-label: --task multilabel is refused
        found = _read_folder(path)
    return _assemble(
        found, val_split=val_split, seed=seed, validate=validate, progress=progress
    )


# --- reading layouts ---------------------------------------------------------------------


def _subdirs(folder: Path) -> list[Path]:
    try:
        entries = list(folder.iterdir())
    except OSError as exc:
        raise DataError(
            f"Cannot read folder {folder}: {exc.strerror or exc}. Check permissions."
        ) from exc
    return sorted(p for p in entries if not is_hidden(p.name) and p.is_dir())


def _loose_images(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if not is_hidden(p.name) and has_image_extension(p) and not p.is_dir()
    )


def _walk_images(folder: Path, found: _Found) -> list[Path]:
    """Image files below ``folder``, recursively; each real directory is visited once,
    so symlink loops terminate and linked folders do not duplicate samples."""
    images: list[Path] = []
    unnamed = 0
    visited: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames[:] = [name for name in dirnames if not is_hidden(name) and not _is_loop(Path(dirpath, name), real, found)]
        for name in filenames:
            path = Path(dirpath, name)
            if not is_hidden(name) and (reason := unsupported_format(path)):
                found.skip(path, reason)
                continue
            if is_hidden(name) or (path.suffix and not has_image_extension(path)):
                continue
            if not path.exists():
                found.skip(path, "broken symlink")
                continue
            if not path.suffix:  # no extension (web downloads): an image if its content says so
                if not looks_like_image(path):
                    continue
                unnamed += 1
            images.append(path)
    if unnamed:
        found.warnings.append(
            f"{unnamed} file(s) without an extension in {_display(folder, found.root)} were recognised "
            "as images by their content and used"
        )
    return sorted(images)


def _is_loop(folder: Path, parent_real: str, found: _Found) -> bool:
    """A linked folder pointing at one of its own ancestors: following it would re-read (and
    mislabel) the images above it, so it is skipped and reported."""
    if not folder.is_symlink():
        return False
    target = os.path.realpath(folder)
    if parent_real == target or parent_real.startswith(target.rstrip(os.sep) + os.sep):
        found.skip(folder, f"symlink loop: links back to its parent folder {target}")
        return True
    return False


def _split_folders(subdirs: Sequence[Path]) -> dict[str, Path]:
    """Split name -> folder for sub-folders named train, val/valid/validation or test."""
    by_name = {p.name.lower(): p for p in subdirs}
    result: dict[str, Path] = {}
    for alias, split in SPLIT_ALIASES.items():
        if alias in by_name and split not in result:
            result[split] = by_name[alias]
    return result


def _read_folder(root: Path) -> _Found:
    subdirs = _subdirs(root)
    split_dirs = _split_folders(subdirs)
    if split_dirs and "train" not in split_dirs:
        names = ", ".join(f"{p.name}/" for p in split_dirs.values())
        raise DataError(
            f"{root} has {names} but no train/ folder. Add train/<class>/ folders with the "
            "training images (or rename the split folders if they are really classes)."
        )
    if split_dirs:
        return _read_split_folders(root, split_dirs)

    found = _Found(
        source=root,
        root=root,
        layout=LAYOUT_CLASS_FOLDERS,
        files={"train": []},
        declared=[],
    )
    _read_class_folders(root, subdirs, "train", found)
    return found


def _read_class_folders(
    folder: Path, class_dirs: Sequence[Path], split: str, found: _Found
) -> None:
    loose = _loose_images(folder)
    if loose and not class_dirs:
        raise DataError(
            f"Found {len(loose)} image(s) directly in {folder} but no class sub-folders. "
            f"Put each class's images in its own sub-folder, e.g. {folder / 'cat'}/ and "
            f"{folder / 'dog'}/."
        )
    if loose:
        found.warnings.append(
            f"{len(loose)} image(s) directly in {_display(folder, found.root)} were ignored: "
            "images must be inside a class sub-folder"
        )
    files = found.files.setdefault(split, [])
    for class_dir in class_dirs:
        files.extend((path, class_dir.name) for path in _walk_images(class_dir, found))
    if split == "train":
        found.declared = [class_dir.name for class_dir in class_dirs]


def _read_split_folders(root: Path, split_dirs: dict[str, Path]) -> _Found:
    found = _Found(
        source=root, root=root, layout=LAYOUT_SPLIT_FOLDERS, files={}, declared=[]
    )
    for split, folder in split_dirs.items():
        _read_class_folders(folder, _subdirs(folder), split, found)
    if "val" not in split_dirs:
        found.layout = LAYOUT_CLASS_FOLDERS
        found.warnings.append(
            "no val/ folder next to train/: holding out part of train/ for validation"
        )
    return found


def _read_shards(data: str | Path) -> _Found:
    from transferlab.data.shards import read_shards

    source = Path(str(data)).expanduser()
    read = read_shards(data)
    found = _Found(source=source, root=source if source.is_dir() else source.parent, layout=LAYOUT_SHARDS,
                   files=read.files, declared=[], skipped=read.skipped)
    found.declared = sorted({label for _, label in found.files["train"]})
    if "val" not in found.files and (source / "train").is_dir():
        found.warnings.append("no val/ shards next to train/: holding out part of train/ for validation")
    return found


def _read_csv(csv_path: Path, anywhere: bool = False, label_sep: str | None = None) -> _Found:
    root = csv_path.parent
    found = _Found(
        source=csv_path, root=root, layout=LAYOUT_CSV, files={"train": []}, declared=[], label_sep=label_sep
    )
    first_line: dict[Path, tuple[int, str]] = {}
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = {
                name.strip().lower(): name for name in reader.fieldnames or [] if name
            }
            if "path" not in columns or multilabel.label_column(columns) is None:
                raise DataError(
                    f"{csv_path} must start with a header row containing 'path' and 'label' (or 'labels') "
                    f"columns (optionally 'split'); found: {', '.join(columns) or 'nothing'}."
                )
            columns["label"] = multilabel.label_column(columns)
            if "split" in columns:
                found.files = {split: [] for split in SPLITS}
            for row in reader:
                where = f"{csv_path.name}:{reader.line_num}"
                _read_csv_row(
                    row, columns, where, reader.line_num, root, first_line, found, anywhere
                )
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{csv_path} is not UTF-8 text ({exc.reason}). Save it as UTF-8 CSV."
        ) from exc
    except csv.Error as exc:
        raise DataError(
            f"{csv_path} is not valid CSV: {exc}. Fix the file and retry."
        ) from exc
    if label_sep is None:
        found.declared = sorted({label for _, label in found.files["train"]})
    else:
        found.declared = sorted({label for _, labels in found.files["train"] for label in labels})
    return found


def _read_csv_row(
    row: dict[str, str | None],
    columns: dict[str, str],
    where: str,
    line: int,
    root: Path,
    first_line: dict[Path, tuple[int, str]],
    found: _Found,
    anywhere: bool = False,
) -> None:
    raw_path = (row.get(columns["path"]) or "").strip()
    label: str | tuple[str, ...] = (row.get(columns["label"]) or "").strip()
    if found.label_sep is not None:
        label = multilabel.split_cell(label, found.label_sep)
    if not raw_path:
        found.skip(where, "missing path")
        return
    if not label:
        found.skip(where, f"missing label for {raw_path}")
        return
    split = "train"
    if "split" in columns:
        raw_split = (row.get(columns["split"]) or "").strip().lower()
        if raw_split not in SPLIT_ALIASES:
            found.skip(
                where, f"unknown split {raw_split!r} (expected train, val or test)"
            )
            return
        split = SPLIT_ALIASES[raw_split]
    path = Path(raw_path).expanduser()
    # Lexically normalised ('a/../b.png' is 'b.png'): one file, one spelling, and '..' cannot climb out
    # unseen. Symlinks are not resolved: a data folder may link to images stored elsewhere.
    path = Path(os.path.normpath(path if path.is_absolute() else root / path))
    if not anywhere and not path.is_relative_to(root):
        found.skip(where, f"{raw_path} is outside the CSV's folder {root}: refused (pass --csv-anywhere "
                          "to read files anywhere on this disk)")
        return
    if path in first_line:
        first, first_label = first_line[path]
        if first_label != label:
            found.skip(where, f"{raw_path} listed again (first at line {first}) with another label {label!r} "
                              f"(there {first_label!r}): one file, one label; the first is used")
        else:
            found.skip(where, f"{raw_path} listed again (first at line {first})")
        return
    if not path.is_file():
        found.skip(path, "file not found")
        return
    first_line[path] = (line, label)
    found.files[split].append((path, label))


# --- validation, splitting, checks --------------------------------------------------------


def _inspect(path: Path) -> tuple[str | None, str | None]:
    """(reason the file is unusable, or None; content digest when usable)."""
    try:
        probe_image(path)
        return None, file_digest(path)
    except ImageError as exc:
        return exc.reason, None
    except OSError as exc:
        return f"unreadable file: {exc.strerror or exc}", None


def _inspect_all(
    paths: Sequence[Path], progress: bool
) -> dict[Path, tuple[str | None, str | None]]:
    """Decoding is mostly GIL-free C code, so a few threads speed this up."""
    workers = max(1, min(_MAX_WORKERS, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results: Iterable[tuple[str | None, str | None]] = pool.map(_inspect, paths)
        results = tracked(results, progress, "Checking images", len(paths))
        return dict(zip(paths, results, strict=True))


def _display(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _stratified_split(
    train: list[tuple[Path, str]], val_split: float, seed: int, warnings: list[str]
) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """Hold out ``val_split`` of every class, at least one image per class with >= 2.

    Each class is shuffled by its own seeded RNG, so adding a class or an image elsewhere
    does not reshuffle the others.
    """
    if not 0.0 < val_split < 1.0:
        raise DataError(
            f"val_split must be between 0 and 1 (exclusive), got {val_split}. "
            "Use e.g. 0.2 to hold out 20% of each class for validation."
        )
    by_class: dict[str, list[Path]] = defaultdict(list)
    for path, name in train:
        by_class[name].append(path)
    kept: list[tuple[Path, str]] = []
    held_out: list[tuple[Path, str]] = []
    for name, paths in by_class.items():
        if len(paths) < 2:
            warnings.append(
                f"class {name!r} has only 1 image: used for training, none for validation"
            )
            kept.extend((path, name) for path in paths)
            continue
        n_val = min(len(paths) - 1, max(1, math.floor(len(paths) * val_split + 0.5)))
        order = sorted(paths)
        random.Random(f"{seed}/{name}").shuffle(order)
        held_out.extend((path, name) for path in sorted(order[:n_val]))
        kept.extend((path, name) for path in sorted(order[n_val:]))
    return kept, held_out


def _drop_unusable(found: _Found, validate: bool, progress: bool) -> dict[Path, str]:
    """Remove undecodable files from ``found``; return digests of the usable ones."""
    candidates = [path for files in found.files.values() for path, _ in files]
    if not candidates and not found.skipped:
        exts = " ".join(sorted(ext.lstrip(".") for ext in IMAGE_EXTENSIONS))
        raise DataError(
            f"No images found in {found.source}: {_HOW_TO_LAYOUT[found.layout]} "
            f"(image types: {exts})."
        )
    if not validate:
        return {}
    results = _inspect_all(list(dict.fromkeys(candidates)), progress)
    for path, (reason, _) in results.items():
        if reason is not None:
            found.skip(path, reason)
    for split, files in found.files.items():
        found.files[split] = [
            (path, name) for path, name in files if results[path][0] is None
        ]
    return {path: digest for path, (_, digest) in results.items() if digest is not None}


def _training_classes(found: _Found, listed: Counter[str]) -> list[str]:
    """Classes with at least one usable training image; empty ones are dropped with a warning.

    ``listed`` counts the training files per class before unreadable ones were removed.
    """
    counts = Counter(name for _, name in found.files["train"])
    if not counts:
        examples = "; ".join(f"{e['path']}: {e['reason']}" for e in found.skipped[:3])
        detail = (
            f"{found.skipped.total} file(s) or row(s) were skipped (e.g. {examples})"
            if found.skipped
            else "the training split is empty"
        )
        raise DataError(
            f"No usable training images in {found.source}: {detail}. "
            f"{_HOW_TO_LAYOUT[found.layout].capitalize()}."
        )
    for name in found.declared:
        if listed[name] == 0:
            found.warnings.append(
                f"class folder {name!r} contains no images and was ignored"
            )
        elif counts[name] == 0:
            found.warnings.append(
                f"class {name!r} was dropped: all {listed[name]} of its training images are "
                "unreadable (see skipped)"
            )
    classes = sorted(counts)
    if len(classes) < 2:
        raise DataError(
            f"Only one class ({classes[0]!r}) has usable training images in {found.source}; a "
            f"classifier needs at least two. {_HOW_TO_LAYOUT[found.layout].capitalize()}."
        )
    return classes


def _check_known_classes(found: _Found, classes: list[str]) -> None:
    known = set(classes)
    for split in ("val", "test"):
        unknown = sorted(
            {name for _, name in found.files.get(split, []) if name not in known}
        )
        if unknown:
            raise DataError(
                f"The {split} split has images of class(es) with no usable training images: "
                f"{', '.join(unknown)}. A model cannot learn a class it never sees: add training "
                f"images for them or remove them from {split}."
            )


def exact_duplicate_groups(
    splits: dict[str, list[Sample]], digests: dict[Path, str]
) -> list[list[tuple[str, Sample]]]:
    """Groups (two or more) of byte-identical files as (split, sample), in split order: the one place
    exact duplicates are found (the load warnings below and `transferlab doctor` both read them)."""
    groups: dict[str, list[tuple[str, Sample]]] = defaultdict(list)
    for split in SPLITS:
        for sample in splits.get(split, []):
            digest = digests.get(sample.path)
            if digest is not None:
                groups[digest].append((split, sample))
    return [members for members in groups.values() if len(members) > 1]


def _finish_warnings(found, splits: dict[str, list[Sample]], digests: dict[Path, str]) -> None:
    """The data's last warnings (files shared across splits, the skipped-files count), each logged once the
    splits are made, single-label or multi-label alike."""
    if digests:
        found.warnings.extend(_duplicate_warnings(splits, digests, found.root))
    if (line := found.skipped.summary_line()) is not None:
        found.warnings.append(line)
    for message in found.warnings:
        logger.info("Data: %s", message)


def _duplicate_warnings(
    splits: dict[str, list[Sample]], digests: dict[Path, str], root: Path
) -> list[str]:
    """Identical files across splits inflate validation scores; within a split they over-weight."""
    across: list[str] = []
    within: dict[str, list[list[tuple[str, Sample]]]] = defaultdict(list)
    for members in exact_duplicate_groups(splits, digests):
        split_names = list(dict.fromkeys(split for split, _ in members))
        if len(split_names) > 1:
            files = " == ".join(_display(sample.path, root) for _, sample in members)
            across.append(f"duplicate across {'/'.join(split_names)}: {files}")
        else:
            within[split_names[0]].append(members)
    warnings = across[:_MAX_DUPLICATE_WARNINGS]
    if len(across) > _MAX_DUPLICATE_WARNINGS:
        warnings.append(
            f"and {len(across) - _MAX_DUPLICATE_WARNINGS} more duplicates across splits"
        )
    for split, split_groups in within.items():
        extra = sum(len(members) - 1 for members in split_groups)
        conflicting = sum(
            1 for members in split_groups if len({s.label for _, s in members}) > 1
        )
        example = " == ".join(
            _display(sample.path, root) for _, sample in split_groups[0]
        )
        line = (
            f"{extra} byte-identical duplicate file(s) within {split} in {len(split_groups)} "
            f"group(s), e.g. {example}; remove copies so they do not count several times"
        )
        if conflicting:
            line += f" ({conflicting} group(s) carry different labels)"
        warnings.append(line)
    return warnings


def _assemble(
    found: _Found, *, val_split: float, seed: int, validate: bool, progress: bool
) -> DataSplits:
    listed = Counter(name for _, name in found.files["train"])
    digests = _drop_unusable(found, validate, progress)
    classes = _training_classes(found, listed)
    _check_known_classes(found, classes)
    if "val" not in found.files:
        found.files["train"], found.files["val"] = _stratified_split(
            found.files["train"], val_split, seed, found.warnings
        )
    elif found.files["val"]:
        with_val = {name for _, name in found.files["val"]}
        for name in classes:
            if name not in with_val:
                found.warnings.append(
                    f"class {name!r} has no validation images; its accuracy is not measured"
                )
    if not found.files["val"]:
        raise DataError(
            f"The validation split of {found.source} is empty: {_HOW_TO_FILL_VAL[found.layout]}."
        )

    label_of = {name: index for index, name in enumerate(classes)}
    splits = {
        split: sorted(
            (Sample(path, label_of[name]) for path, name in found.files.get(split, [])),
            key=lambda s: (s.label, s.path),
        )
        for split in SPLITS
    }
    _finish_warnings(found, splits, digests)
    return DataSplits(
        classes=classes,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        skipped=found.skipped,
        warnings=found.warnings,
        layout=found.layout,
        digests=digests,
    )


def _assemble_multilabel(
    found: _Found, *, val_split: float, seed: int, validate: bool, progress: bool
) -> DataSplits:
    """`_assemble` for a multi-label CSV (`found.files` holds (path, label names)): the labels are those
    of the usable training images; val and test may hold no other label; the val split, when none is
    given, is held out by each image's rarest label (`multilabel.holdout_split`)."""
    digests = _drop_unusable(found, validate, progress)
    train = found.files["train"]
    classes = sorted({name for _, names in train for name in names})
    if not train:
        raise DataError(f"No usable training images in {found.source}: {found.skipped.total} file(s) or row(s) "
                        f"were skipped. {_HOW_TO_LAYOUT[found.layout].capitalize()}.")
    if len(classes) < 2:
        raise DataError(f"Only one label ({classes[0]!r}) appears in the training rows of {found.source}; a "
                        "multi-label classifier needs at least two labels.")
    known = set(classes)
    for split in ("val", "test"):
        unknown = sorted({name for _, names in found.files.get(split, []) for name in names} - known)
        if unknown:
            raise DataError(f"The {split} split has label(s) no usable training image has: {', '.join(unknown)}. "
                            f"A model cannot learn a label it never sees: add training images for them or remove "
                            f"them from {split}.")
    if "val" not in found.files:
        found.files["train"], found.files["val"] = multilabel.holdout_split(train, val_split, seed, found.warnings)
    if not found.files["val"]:
        raise DataError(f"The validation split of {found.source} is empty: {_HOW_TO_FILL_VAL[found.layout]}.")
    found.warnings.extend(multilabel.few_positives(found.files["train"]))
    label_of = {name: index for index, name in enumerate(classes)}

    def sample(path: Path, names: tuple[str, ...]) -> Sample:
        indices = tuple(sorted(label_of[name] for name in names))
        return Sample(path, indices[0], indices)

    splits = {split: sorted((sample(path, names) for path, names in found.files.get(split, [])),
                            key=lambda s: (s.label, s.path))
              for split in SPLITS}
    _finish_warnings(found, splits, digests)
    return DataSplits(classes=classes, train=splits["train"], val=splits["val"], test=splits["test"],
                      skipped=found.skipped, warnings=found.warnings, layout=found.layout, digests=digests,
                      task=multilabel.MULTILABEL, label_sep=found.label_sep)
