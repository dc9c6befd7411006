"""Which labelled images an evaluation scores, with labels mapped onto the model's classes.

Two sources:

* the run's own data (the default): re-read with the run's ``val_split`` and ``seed`` through
  :func:`load_splits`, so "val" is exactly the split the run was validated on;
* any other labelled data: an ImageFolder tree (``--split`` picks ``train/``, ``val/`` or ``test/``),
  a folder of class folders or a ``path,label[,split]`` CSV (all of it, unless the CSV has a split
  column). It is read here rather than by :func:`load_splits`, whose checks are about training
  (at least two classes, a validation split): a folder holding only new photos of one class is
  valid evaluation data. Files are not decoded here; unreadable ones are skipped when scored.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from transferlab.data import multilabel
from transferlab.data.images import has_image_extension
from transferlab.data.sources import LAYOUT_SPLIT_FOLDERS, Sample, load_splits
from transferlab.data.splits import SPLITS, split_folder_names
from transferlab.errors import DataError, RunDirError
from transferlab.paths import hidden_under, is_hidden, slug
from transferlab.run_dir import RunDir

__all__ = ["EvalData", "eval_data"]

ALL = "all"  # the split name when the whole of DATA is scored
_SPLIT_FOLDERS: dict[str, tuple[str, ...]] = {split: split_folder_names(split) for split in SPLITS}


@dataclass
class EvalData:
    """Samples to score (labels index the model's classes) and what was left out, and why."""

    name: str  # names the output: eval-<name>.json
    split: str  # train | val | test | all
    source: str
    samples: list[Sample]
    skipped: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def eval_data(run_dir: Path, classes: Sequence[str], data: str | Path | None = None, split: str = "val",
              *, progress: bool = True, label_sep: str | None = None) -> EvalData:
    """The evaluation set for a run: its own `split`, or `data` (see the module docstring). `label_sep`:
    a multi-label model's separator (model.json): a CSV's cells then list several labels, and the
    samples carry them all (``Sample.labels``)."""
    if split not in SPLITS:
        raise DataError(f"Unknown split '{split}': choose one of {', '.join(SPLITS)}.")
    trained_on = _run_data_path(run_dir)
    if data is None or (trained_on is not None and _same_path(data, trained_on)):
        return _run_split(run_dir, classes, split, progress)
    path = Path(data).expanduser()
    if label_sep is not None and not (path.is_file() and path.suffix.lower() == ".csv"):
        raise DataError(f"This model is multi-label: evaluate it on a CSV with a path,labels header (labels "
                        f"separated by {label_sep!r}); {path} is not a CSV file.")
    from transferlab.data import shards

    if shards.is_shard_source(data):
        pairs, skipped, split_used = _read_shards(data, split)
    elif not path.exists():
        raise DataError(f"Evaluation data not found: {path}. Pass a folder of class folders, an ImageFolder "
                        "tree with train/ val/ test/, or a CSV with a path,label header.")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise DataError(f"{path} is a file but not a .csv: pass a folder of class folders or a CSV file.")
        pairs, skipped, split_used = _read_csv(path, split, label_sep)
    else:
        pairs, skipped, split_used = _read_folder(path, split)
    if not pairs:
        raise DataError(f"No images found in {path}{'' if split_used == ALL else f' ({split_used} split)'}: "
                        "put each class's images in a sub-folder named after the class.")
    samples = _to_samples(pairs, classes, path)
    warnings = []
    if split_used == ALL:
        warnings.append(f"{path} has no split folders or split column: all {len(pairs)} images are evaluated")
    name = f"{path.resolve().stem or 'data'}-{split_used}"
    return EvalData(name=slug(name, "data"), split=split_used, source=str(path), samples=samples, skipped=skipped,
                    warnings=warnings)


def _read_shards(data: str | Path, split: str) -> tuple[list[tuple[Path, str]], list[dict[str, str]], str]:
    """WebDataset shards: the split's shard folder when there are split folders, else all of them."""
    from transferlab.data.shards import read_shards

    read = read_shards(data)
    path = Path(str(data)).expanduser()
    has_splits = path.is_dir() and any((path / name).is_dir() for names in _SPLIT_FOLDERS.values() for name in names)
    if has_splits:
        return read.files.get(split, []), read.skipped, split
    return [pair for files in read.files.values() for pair in files], read.skipped, ALL


def _run_config(run_dir: Path) -> dict | None:
    path = RunDir(run_dir).config_path
    if not path.is_file():
        return None
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise RunDirError(f"{path} is unreadable ({exc}); pass the data to evaluate explicitly.") from exc


def _run_data_path(run_dir: Path) -> str | None:
    cfg = _run_config(run_dir)
    return (cfg or {}).get("data") or None


def _same_path(a: str | Path, b: str | Path) -> bool:
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except OSError:
        return False


def _run_split(run_dir: Path, classes: Sequence[str], split: str, progress: bool) -> EvalData:
    """The run's own split, reproduced: same data, val_split and seed as training."""
    cfg = _run_config(run_dir)
    if not cfg or not cfg.get("data"):
        raise RunDirError(f"'{run_dir}' has no config.yaml naming its data: pass the data to evaluate "
                          f"(transferlab evaluate {run_dir} DATA).")
    options = {"val_split": cfg.get("val_split", 0.2), "seed": cfg.get("seed", 0), "progress": progress,
               "csv_anywhere": bool(cfg.get("csv_anywhere", False)),
               # the task the run resolved to (config.yaml); runs from before tasks were single-label
               "task": cfg.get("task") or "single", "label_sep": cfg.get("label_sep")}
    try:
        splits = load_splits(cfg["data"], validate=False, **options)
        if splits.layout != LAYOUT_SPLIT_FOLDERS:
            # the val split was drawn after unreadable files were dropped: validate as training did to
            # redraw the same one (with val/ folders decoding every image up front is wasted work;
            # unreadable files are skipped when scored)
            splits = load_splits(cfg["data"], validate=True, **options)
    except DataError as exc:
        raise DataError(f"Cannot re-read the data this run was trained on ({exc}) Pass the data to evaluate: "
                        f"transferlab evaluate {run_dir} DATA") from exc
    chosen = getattr(splits, split)
    if not chosen:
        raise DataError(f"The run's data ({cfg['data']}) has no {split} split; choose --split val or train, "
                        "or pass other labelled data.")
    pairs = [(s.path, tuple(splits.classes[i] for i in s.labels) if s.labels else splits.classes[s.label])
             for s in chosen]
    return EvalData(name=split, split=split, source=str(cfg["data"]), samples=_to_samples(pairs, classes, cfg["data"]),
                    skipped=list(splits.skipped), warnings=list(splits.warnings))


def _to_samples(pairs: Sequence[tuple[Path, str | tuple[str, ...]]], classes: Sequence[str],
                source: str | Path) -> list[Sample]:
    """Samples with labels indexing `classes`; a pair naming a tuple of labels makes a multi-label sample."""
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({name for _, names in pairs for name in ((names,) if isinstance(names, str) else names)
                      if name not in index})
    if unknown:
        known = ", ".join(list(classes)[:20]) + (", ..." if len(classes) > 20 else "")
        raise DataError(f"{source} has class(es) the model does not know: {', '.join(unknown)}. "
                        f"The model was trained on: {known}. Rename or remove those folders/labels.")
    samples = []
    for path, names in pairs:
        if isinstance(names, str):
            samples.append(Sample(Path(path), index[names]))
        else:
            labels = tuple(sorted(index[name] for name in names))
            samples.append(Sample(Path(path), labels[0], labels))
    return samples


def _read_folder(root: Path, split: str) -> tuple[list[tuple[Path, str]], list[dict[str, str]], str]:
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not is_hidden(p))
    by_name = {p.name.lower(): p for p in subdirs}
    split_dirs = {s: next((by_name[a] for a in aliases if a in by_name), None) for s, aliases in _SPLIT_FOLDERS.items()}
    present = [s for s, p in split_dirs.items() if p is not None]
    if present:
        folder = split_dirs[split]
        if folder is None:
            raise DataError(f"{root} has no {split}/ folder (it has {', '.join(f'{s}/' for s in present)}): "
                            f"choose one with --split.")
        class_dirs, used = sorted(p for p in folder.iterdir() if p.is_dir() and not is_hidden(p)), split
    else:
        class_dirs, used = subdirs, ALL
    pairs: list[tuple[Path, str]] = []
    skipped: list[dict[str, str]] = []
    for class_dir in class_dirs:
        for path in sorted(class_dir.rglob("*")):
            if not has_image_extension(path) or hidden_under(path, class_dir):
                continue
            if path.is_file():
                pairs.append((path, class_dir.name))
            elif not path.exists():
                skipped.append({"path": str(path), "reason": "broken symlink"})
    return pairs, skipped, used


def _read_csv(csv_path: Path, split: str, label_sep: str | None = None
              ) -> tuple[list[tuple[Path, str | tuple[str, ...]]], list[dict[str, str]], str]:
    aliases = {a: s for s, names in _SPLIT_FOLDERS.items() for a in names}
    pairs: list[tuple[Path, str]] = []
    skipped: list[dict[str, str]] = []
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = {name.strip().lower(): name for name in reader.fieldnames or [] if name}
            label_column = multilabel.label_column(columns)
            if "path" not in columns or label_column is None:
                raise DataError(f"{csv_path} must start with a header row with 'path' and 'label' (or 'labels') "
                                "columns (optionally 'split').")
            has_split = "split" in columns
            for row in reader:
                raw = (row.get(columns["path"]) or "").strip()
                cell = (row.get(label_column) or "").strip()
                label = multilabel.split_cell(cell, label_sep) if label_sep is not None else cell
                if has_split and aliases.get((row.get(columns["split"]) or "").strip().lower()) != split:
                    continue
                if not raw or not label:
                    skipped.append({"path": f"{csv_path.name}:{reader.line_num}", "reason": "missing path or label"})
                    continue
                path = Path(raw).expanduser()
                path = path if path.is_absolute() else csv_path.parent / path
                if not path.is_file():
                    skipped.append({"path": str(path), "reason": "file not found"})
                    continue
                pairs.append((path, label))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{csv_path} is not a valid UTF-8 CSV file ({exc}).") from exc
    return pairs, skipped, split if has_split else ALL
