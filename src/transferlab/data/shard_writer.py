"""Writing any dataset `load_splits` reads as WebDataset tar shards (`transferlab shards DATA OUT`)."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

from transferlab.data.sources import load_splits
from transferlab.data.storage import SHARD_SUFFIX, member_bytes
from transferlab.errors import DataError
from transferlab.io import atomic_write_json

__all__ = ["write_shards"]


def write_shards(data: str | Path, out: str | Path, *, shard_size: int = 1000, val_split: float = 0.2,
                 seed: int = 0, progress: bool = True) -> dict:
    """Write a dataset (any layout `load_splits` reads) as WebDataset shards, one folder per split:
    OUT/train/train-000000.tar … with ``KEY.<ext>`` (the original bytes), ``KEY.cls`` (class
    number) and ``KEY.json`` (class name, source path). Samples are shuffled (seeded) so that a
    sequential reader sees mixed classes. Returns the manifest also written to OUT/shards.json."""
    if shard_size < 1:
        raise DataError("--shard-size must be >= 1")
    splits = load_splits(data, val_split=val_split, seed=seed, progress=progress)
    out = Path(out)
    manifest: dict = {"format": "webdataset", "classes": splits.classes, "splits": {}}
    for split in ("train", "val", "test"):
        samples = list(getattr(splits, split))
        if not samples:
            continue
        random.Random(f"{seed}/{split}").shuffle(samples)
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        names = []
        for first in range(0, len(samples), shard_size):
            name = f"{split}-{first // shard_size:06d}{SHARD_SUFFIX}"
            _write_tar(folder / name, samples[first:first + shard_size], first, splits.classes)
            names.append(f"{split}/{name}")
        manifest["splits"][split] = {"shards": names, "samples": len(samples),
                                     "counts": splits.counts()[split]}
    atomic_write_json(out / "shards.json", manifest)
    return manifest


def _write_tar(path: Path, samples, first_index: int, classes: list[str]) -> None:
    """Reproducible tars (fixed mtime/owner), written to a temporary name and renamed when complete."""
    tmp = path.with_name(path.name + ".tmp")

    def add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(payload), 0o444, 0
        tar.addfile(info, io.BytesIO(payload))

    with tarfile.open(tmp, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, sample in enumerate(samples):
            key = f"{first_index + i:08d}"
            ext = sample.path.suffix.lower().lstrip(".")
            add(tar, f"{key}.{ext}", _read(sample.path))
            add(tar, f"{key}.cls", str(sample.label).encode())
            meta = {"label": classes[sample.label], "source": sample.path.name}
            add(tar, f"{key}.json", json.dumps(meta).encode())
    tmp.replace(path)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except NotADirectoryError:  # re-sharding shards
        return member_bytes(path)
