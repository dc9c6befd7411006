"""Recipes end to end on stand-ins for their datasets, written in each dataset's real on-disk layout
(flowers-102/jpg + .mat files, cifar-10-batches-py, stl10_binary, hymenoptera_data), offline, with
--no-pretrained, one epoch per stage and 32 px: the code path a GPU user runs, shrunk."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import COLOURS, make_image, make_image_folder
from PIL import Image

from transferlab import api
from transferlab.data.public import prepare_dataset
from transferlab.errors import DataError, TransferlabError
from transferlab.recipes import RecipeError, list_recipes, load_recipe, resolve_recipe

# One stage each, 32 px, tiny batches: every override a GPU user would leave out.
TINY = ["epochs_frozen=1", "epochs_finetune=1", "img_size=32", "batch_size=4", "num_workers=0", "report=false"]
PALETTE = list(COLOURS.values()) + [(200, 200, 40)]


def cli(*args):
    env = {**os.environ, "TRANSFERLAB_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "transferlab", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300, check=False)


def _pixels(label: int, rng: np.random.Generator, size: int) -> np.ndarray:
    base = np.array(PALETTE[label % len(PALETTE)], dtype=np.float32)
    return np.clip(base + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)


def make_flowers(root: Path, classes: int = 3, per_split=(4, 2, 2)) -> Path:
    """flowers-102/jpg/image_00001.jpg..., imagelabels.mat, setid.mat as Oxford ships them (labels 1-based;
    setid holds trnid/valid/tstid image ids); per_split = images per class in tstid, trnid, valid."""
    from scipy.io import savemat

    base = root / "flowers-102"
    (base / "jpg").mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels, ids = [], {"tstid": [], "trnid": [], "valid": []}
    for label in range(classes):
        for key, n in zip(("tstid", "trnid", "valid"), per_split):
            for _ in range(n):
                labels.append(label + 1)
                ids[key].append(len(labels))
                Image.fromarray(_pixels(label, rng, 40)).save(base / "jpg" / f"image_{len(labels):05d}.jpg")
    savemat(base / "imagelabels.mat", {"labels": np.array([labels], dtype=np.uint8)})
    savemat(base / "setid.mat", {k: np.array([v], dtype=np.uint16) for k, v in ids.items()})
    return root


def make_cifar(root: Path, per_batch: int = 6, names=("airplane", "automobile", "bird")) -> Path:
    """cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}: pickled dicts, uint8 rows of
    3x32x32 channel-planar pixels, as the official archive holds them."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [i % len(names) for i in range(per_batch)]
        data = np.stack([_pixels(lbl, rng, 32).transpose(2, 0, 1).reshape(-1) for lbl in labels])
        batch = {"batch_label": name, "labels": labels, "data": data,
                 "filenames": [f"{name}_{i}.png" for i in range(per_batch)]}
        (base / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {"num_cases_per_batch": per_batch, "label_names": list(names), "num_vis": 3072}
    (base / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


def make_stl(root: Path, train: int = 8, test: int = 6, names=("airplane", "bird")) -> Path:
    """stl10_binary/{train,test}_{X,y}.bin + class_names.txt: uint8 images stored column-major per
    channel (N x 3 x 96 x 96, W before H) and labels 1..10, as the official archive holds them."""
    base = root / "stl10_binary"
    base.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for split, n in (("train", train), ("test", test)):
        labels = np.array([i % len(names) for i in range(n)], dtype=np.uint8)
        images = np.stack([_pixels(int(lbl), rng, 96) for lbl in labels])  # N x H x W x 3
        images.transpose(0, 3, 2, 1).tofile(base / f"{split}_X.bin")  # N x 3 x W x H
        (labels + 1).tofile(base / f"{split}_y.bin")
    (base / "class_names.txt").write_text("\n".join(names) + "\n")
    return root
