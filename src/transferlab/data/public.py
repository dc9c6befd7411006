"""Public datasets (torchvision's Flowers102, CIFAR10, STL10; the PyTorch tutorial's ants/bees) in their
own on-disk layout -> a ``path,label,split`` CSV that :func:`~transferlab.data.sources.load_splits` reads.

A registry, not an if-chain: each :class:`PublicDataset` names the files its official layout holds (taken
from torchvision's own dataset class, so they cannot drift), how to download them (through that class),
and how to list ``(image, label)`` items per split. Image files (Flowers-102 JPEGs) are referenced where
they lie; datasets shipped as arrays (CIFAR-10, STL-10) are written once as PNGs beside them.

The layout is checked before any download, and offline a missing dataset fails at once with the exact
files to fetch and where to put them. CIFAR-10's batches are Python pickles (its official format): they
are read with an unpickler that can build numpy arrays and nothing else.
"""

from __future__ import annotations

import csv
import io
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transferlab.errors import DataError
from transferlab.network import address, offline_by_env, probe

__all__ = ["DATASETS", "PublicDataset", "dataset_missing", "ensure_dataset", "missing_message", "offline_reason",
           "prepare_dataset"]

Item = tuple["Path | np.ndarray", int]
_MARKER = ".complete"  # hidden: the folder loader ignores it  # an image file, or an HxWx3 uint8 array; a class index


@dataclass(frozen=True)
class PublicDataset:
    """One public dataset in its official on-disk layout under a root folder."""

    name: str  # registry key, as in a recipe's dataset.name
    splits: tuple[str, ...]  # the dataset's own split names
    files: Callable[[], list[str]]  # paths (relative to root) the layout must hold
    urls: Callable[[], list[tuple[str, str, str]]]  # (url, folder under root to put it in, note): offline message
    download: Callable[[Path], None]  # through torchvision (md5-checked)
    classes: Callable[[Path], list[str]]
    items: Callable[[Path, str], Iterable[Item]]  # (root, split) -> (image, label index)
    source: str  # the class or URL the download goes through, for messages


# ------------------------------------------------------------------------------------- Flowers-102


def _flowers_cls():
    from torchvision.datasets import Flowers102

    return Flowers102


def _flowers_files() -> list[str]:
    fd = _flowers_cls()._file_dict
    return ["flowers-102/jpg/", f"flowers-102/{fd['label'][0]}", f"flowers-102/{fd['setid'][0]}"]


def _flowers_urls() -> list[tuple[str, str, str]]:
    cls = _flowers_cls()
    return [(cls._download_url_prefix + cls._file_dict[k][0], "flowers-102", "unpack: it holds jpg/" if k == "image" else "")
            for k in ("image", "label", "setid")]


def _flowers_items(root: Path, split: str) -> Iterable[Item]:
    from scipy.io import loadmat  # the official .mat files (a data format, not a pickle)

    base = root / "flowers-102"
    split_key = _flowers_cls()._splits_map[split]
    ids = np.atleast_1d(loadmat(base / "setid.mat", squeeze_me=True)[split_key]).tolist()
    labels = np.atleast_1d(loadmat(base / "imagelabels.mat", squeeze_me=True)["labels"]).tolist()
    for image_id in ids:
        yield base / "jpg" / f"image_{int(image_id):05d}.jpg", int(labels[int(image_id) - 1]) - 1


def _flowers_classes(root: Path) -> list[str]:
    names = getattr(_flowers_cls(), "classes", None)  # torchvision >= 0.20 ships the 102 names
    return list(names) if names else [f"{i:03d}" for i in range(1, 103)]


def _flowers_download(root: Path) -> None:
    _flowers_cls()(str(root), split="train", download=True)


# ------------------------------------------------------------------------------------------ CIFAR-10

_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"),  # how Python 3 writes bytes at protocol 2 (a copy re-pickled by Python 3)
}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """CIFAR's batches are pickled dicts of bytes, lists and numpy arrays: anything else is refused,
    so a tampered file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file")


def _read_batch(path: Path) -> dict[str, Any]:
    try:
        raw = _ArraysOnlyUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise DataError(f"{path} is not a CIFAR-10 batch in the official format ({exc}). Delete it and download "
                        "the dataset again.") from exc
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _cifar_cls():
    from torchvision.datasets import CIFAR10

    return CIFAR10


def _cifar_files() -> list[str]:
    cls = _cifar_cls()
    names = [n for n, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    return [f"{cls.base_folder}/{n}" for n in names]


def _cifar_classes(root: Path) -> list[str]:
    cls = _cifar_cls()
    return [str(n) for n in _read_batch(root / cls.base_folder / cls.meta["filename"])[cls.meta["key"]]]


def _cifar_items(root: Path, split: str) -> Iterable[Item]:
    cls = _cifar_cls()
    for name, _ in cls.train_list if split == "train" else cls.test_list:
        batch = _read_batch(root / cls.base_folder / name)
        images = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        for image, label in zip(images, batch["labels"], strict=True):
            yield image, int(label)


# ------------------------------------------------------------------------------------------- STL-10


def _stl_cls():
    from torchvision.datasets import STL10

    return STL10


def _stl_files() -> list[str]:
    cls = _stl_cls()
    names = [n for n, _ in cls.train_list[:2] + cls.test_list] + [cls.class_names_file]
    return [f"{cls.base_folder}/{n}" for n in names]


def _stl_classes(root: Path) -> list[str]:
    cls = _stl_cls()
    text = (root / cls.base_folder / cls.class_names_file).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _stl_items(root: Path, split: str) -> Iterable[Item]:
    cls = _stl_cls()
    x_name, y_name = (cls.train_list[0][0], cls.train_list[1][0]) if split == "train" else \
        (cls.test_list[0][0], cls.test_list[1][0])
    base = root / cls.base_folder
    labels = np.fromfile(base / y_name, dtype=np.uint8).astype(np.int64) - 1  # stored 1..10
    # stored column-major per channel (as torchvision reads it): N x 3 x 96 x 96, then W/H swapped
    images = np.fromfile(base / x_name, dtype=np.uint8).reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1)
    if len(images) != len(labels):
        raise DataError(f"{base}: {len(images)} images but {len(labels)} labels in the {split} split. "
                        "Delete the folder and download the dataset again.")
    for image, label in zip(images, labels, strict=True):
        yield image, int(label)


# ------------------------------------------------------------------------------ ants/bees (hymenoptera)

_HYMENOPTERA_URL = "https://download.pytorch.org/tutorial/hymenoptera_data.zip"
_HYMENOPTERA = "hymenoptera_data"


def _hymenoptera_classes(root: Path) -> list[str]:
    return sorted(p.name for p in (root / _HYMENOPTERA / "train").iterdir() if p.is_dir())


def _hymenoptera_items(root: Path, split: str) -> Iterable[Item]:
    from transferlab.data.images import has_image_extension

    for label, name in enumerate(_hymenoptera_classes(root)):
        for path in sorted((root / _HYMENOPTERA / split / name).glob("*")):
            if has_image_extension(path):
                yield path, label


def _hymenoptera_download(root: Path) -> None:
    from torchvision.datasets.utils import download_and_extract_archive

    download_and_extract_archive(_HYMENOPTERA_URL, str(root))


# ---------------------------------------------------------------------------------------- registry


def _tv_download(cls_getter: Callable[[], Any]) -> Callable[[Path], None]:
    def download(root: Path) -> None:
        cls_getter()(str(root), download=True)

    return download


DATASETS: dict[str, PublicDataset] = {
    "Flowers102": PublicDataset(
        name="Flowers102", splits=("train", "val", "test"), files=_flowers_files, urls=_flowers_urls,
        download=_flowers_download, classes=_flowers_classes, items=_flowers_items,
        source="torchvision.datasets.Flowers102"),
    "CIFAR10": PublicDataset(
        name="CIFAR10", splits=("train", "test"), files=_cifar_files,
        urls=lambda: [(_cifar_cls().url, "", "unpack: it holds cifar-10-batches-py/")],
        download=_tv_download(_cifar_cls), classes=_cifar_classes, items=_cifar_items,
        source="torchvision.datasets.CIFAR10"),
    "STL10": PublicDataset(
        name="STL10", splits=("train", "test"), files=_stl_files,
        urls=lambda: [(_stl_cls().url, "", "unpack: it holds stl10_binary/")],
        download=_tv_download(_stl_cls), classes=_stl_classes, items=_stl_items,
        source="torchvision.datasets.STL10"),
    "hymenoptera": PublicDataset(
        name="hymenoptera", splits=("train", "val"),
        files=lambda: [f"{_HYMENOPTERA}/train/", f"{_HYMENOPTERA}/val/"],
        urls=lambda: [(_HYMENOPTERA_URL, "", "unzip: it holds hymenoptera_data/")],
        download=_hymenoptera_download, classes=_hymenoptera_classes, items=_hymenoptera_items,
        source="torchvision.datasets.utils.download_and_extract_archive (PyTorch transfer-learning tutorial data)"),
}
"""Dataset name (as in a recipe's ``dataset.name``) -> its adapter."""


# ------------------------------------------------------------------------------------- preparation


def _get(name: str) -> PublicDataset:
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(f"Unknown dataset {name!r}; known: {', '.join(DATASETS)}") from None


def dataset_missing(name: str, root: Path) -> list[str]:
    """Paths (relative to ``root``) of the official layout that are not there; [] when complete."""
    missing = []
    for rel in _get(name).files():
        path = root / rel
        ok = path.is_dir() and any(path.iterdir()) if rel.endswith("/") else path.is_file()
        if not ok:
            missing.append(rel)
    return missing


def offline_reason(urls: Sequence[str]) -> str | None:
    if reason := offline_by_env():
        return reason
    for url in urls:
        host, port = address(url)
        if not probe(host, port, 3.0):
            return f"{host} cannot be reached"
    return None


def missing_message(ds: PublicDataset, root: Path, missing: list[str], reason: str) -> str:
    lines = [f"Dataset {ds.name} is not under {root} and cannot be downloaded ({reason}).",
             "Missing: " + ", ".join(str(root / m) for m in missing) + ".",
             "Download on a machine with internet:"]
    lines += [f"  {url} -> {root / folder if folder else root}/" + (f" ({note})" if note else "")
              for url, folder, note in ds.urls()]
    lines.append(f"so that {root} holds: " + ", ".join(ds.files()) + ". Then run again with --data-root "
                 f"{root} (or with network access, where {ds.source} downloads it).")
    return "\n".join(lines)


def ensure_dataset(name: str, root: Path) -> None:
    """The official layout is under ``root`` afterwards, or a DataError says what to fetch and where."""
    ds = _get(name)
    missing = dataset_missing(name, root)
    if not missing:
        return
    reason = offline_reason([url for url, *_ in ds.urls()])
    if reason:
        raise DataError(missing_message(ds, root, missing, reason))
    root.mkdir(parents=True, exist_ok=True)
    try:
        ds.download(root)
    except (OSError, RuntimeError) as exc:  # torchvision: URLError (an OSError) or RuntimeError on bad md5
        raise DataError(f"Downloading {name} into {root} failed: {exc}\n"
                        + missing_message(ds, root, missing, "download failed")) from exc
    still = dataset_missing(name, root)
    if still:
        raise DataError(missing_message(ds, root, still, "the download did not produce them"))


def _split_tag(mapping: Mapping[str, Sequence[str]]) -> str:
    return "_".join(f"{ours}-{'+'.join(theirs)}" for ours, theirs in mapping.items())


def prepare_dataset(name: str, root: str | Path, mapping: Mapping[str, Sequence[str]]) -> Path:
    """Check (or download) dataset ``name`` under ``root`` and write ``root/transferlab/<name>_<splits>.csv``
    whose ``split`` column follows ``mapping`` (our split -> the dataset's splits, e.g. Flowers-102's
    ``{"train": ["test"], "val": ["train", "val"]}``). Idempotent: a finished CSV is reused."""
    ds = _get(name)
    root = Path(root).expanduser().absolute()
    bad = {ours for ours in mapping if ours not in ("train", "val", "test")}
    bad |= {t for theirs in mapping.values() for t in theirs if t not in ds.splits}
    if bad or "train" not in mapping or "val" not in mapping:
        raise DataError(f"Invalid split mapping {dict(mapping)} for {name}: keys train, val (and optionally test), "
                        f"values lists of {', '.join(ds.splits)}.")
    ensure_dataset(name, root)
    out_dir = root / "transferlab"
    csv_path = out_dir / f"{name.lower()}_{_split_tag(mapping)}.csv"
    if csv_path.is_file():
        return csv_path
    classes = ds.classes(root)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name.lower()}-", dir=out_dir))
    except OSError as exc:
        raise DataError(f"Cannot write the {name} index under {out_dir} ({exc.strerror or exc}); "
                        "choose a writable --data-root.") from exc
    try:
        rows = _write_items(ds, root, mapping, classes, staging, out_dir)
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows)
        tmp = staging / "index.csv"
        tmp.write_text(buf.getvalue(), encoding="utf-8")
        os.replace(tmp, csv_path)  # the commit point: a CSV exists only when its images do
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return csv_path


def _write_items(ds: PublicDataset, root: Path, mapping: Mapping[str, Sequence[str]], classes: list[str],
                 staging: Path, out_dir: Path) -> list[tuple[str, str, str]]:
    """CSV rows (path relative to out_dir, class name, our split). Array images are written as PNGs, one
    folder per dataset split, staged and renamed into place (marker last), and reused once complete."""
    from PIL import Image

    rows: list[tuple[str, str, str]] = []
    for ours, theirs in mapping.items():
        for split in theirs:
            folder = out_dir / ds.name.lower() / split
            done = (folder / _MARKER).is_file()
            written = 0
            for index, (image, label) in enumerate(ds.items(root, split)):
                if not 0 <= label < len(classes):
                    raise DataError(f"{ds.name} {split} item {index} has label {label + 1}, outside 1..{len(classes)}.")
                if isinstance(image, Path):
                    rel = os.path.relpath(image, out_dir)
                else:  # arrays become PNGs: lossless, and a format the folder loader reads
                    name = f"{index:05d}.png"
                    if not done:
                        (staging / split).mkdir(parents=True, exist_ok=True)
                        Image.fromarray(np.ascontiguousarray(image)).save(staging / split / name, compress_level=1)
                        written += 1
                    rel = (folder / name).relative_to(out_dir)
                rows.append((Path(rel).as_posix(), classes[label], ours))
            if written:
                (staging / split / _MARKER).write_text(f"{written}\n")
                if folder.exists():
                    shutil.rmtree(folder)
                folder.parent.mkdir(parents=True, exist_ok=True)
                (staging / split).rename(folder)
    return rows
