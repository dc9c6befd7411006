"""Shared fixtures: tiny generated image datasets and an isolated transferlab home (no network)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}


def make_image(path: Path, colour: tuple[int, int, int], rng: np.random.Generator, size: int = 40) -> Path:
    """A noisy image tinted with `colour`: trivially separable classes, cheap to decode."""
    base = np.array(colour, dtype=np.float32)[None, None, :]
    noise = rng.normal(0, 30, size=(size, size, 3))
    arr = np.clip(base + noise, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def make_image_folder(root: Path, classes=("red", "blue"), per_class=(12, 6), seed: int = 0, splits=("train", "val")) -> Path:
    """root/{train,val}/<class>/*.png with per_class[i] images in split i."""
    rng = np.random.default_rng(seed)
    for split, n in zip(splits, per_class):
        for c in classes:
            for i in range(n):
                make_image(root / split / c / f"{c}_{i}.png", COLOURS[c], rng)
    return root


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    """Caches go to a temp dir; network lookups are off so nothing ever waits on a socket."""
    home = tmp_path_factory.mktemp("tlhome")
    monkeypatch.setenv("TRANSFERLAB_HOME", str(home))
    monkeypatch.setenv("TRANSFERLAB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield home
    logger = logging.getLogger("transferlab")
    for h in list(logger.handlers):
        if isinstance(h, logging.FileHandler):
            logger.removeHandler(h)
            h.close()


@pytest.fixture
def extraction_calls(monkeypatch) -> list[int]:
    """Spy on frozen-backbone passes: one entry (number of images) per `extract_features` call."""
    from transferlab.training import feature_cache

    calls: list[int] = []
    real = feature_cache.extract_features

    def counting(model, samples, *a, **k):
        calls.append(len(samples))
        return real(model, samples, *a, **k)

    monkeypatch.setattr(feature_cache, "extract_features", counting)
    return calls


@pytest.fixture
def built_devices(monkeypatch) -> list[str]:
    """Spy on model construction: the device type of each `build_classifier` result ("meta": no weights)."""
    from transferlab.models import heads

    devices: list[str] = []
    real = heads.build_classifier

    def counting(*args, **kwargs):
        model = real(*args, **kwargs)
        devices.append(next(model.parameters()).device.type)
        return model

    monkeypatch.setattr(heads, "build_classifier", counting)
    return devices


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    return make_image_folder(tmp_path / "data")


# A run small enough for a test: random-init timm test model, 32 px, a few epochs.
TINY = {
    "backbone": "test_efficientnet",
    "pretrained": False,
    "img_size": 32,
    "epochs_frozen": 3,
    "epochs_finetune": 2,
    "batch_size": 8,
    "num_workers": 0,
    "progress": False,
    "early_stop": 0,
    "finetune": "full",  # the whole-network loop these tests pin; test_boundary.py covers the default
    "finetune_gate": 0,  # every fine-tuning epoch runs: the tests count them (test_finetune_gate.py pins the gate)
    "lr_head": 0.05,
    "report": False,
}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One finished TINY two-stage run (seed 0) on `make_image_folder` data, shared by the tests that
    compare against an uninterrupted run or need a trained run: copy it before changing anything."""
    return train_tiny_run(tmp_path_factory.mktemp("tiny_run"), **TINY)


def train_tiny_run(root: Path, **options) -> Path:
    """Train on `make_image_folder` data under `root` with its own offline TRANSFERLAB_HOME (for
    fixtures wider than one test, where the autouse `isolated_home` does not reach)."""
    import transferlab

    data = make_image_folder(root / "data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRANSFERLAB_HOME", str(root / "home"))
        mp.setenv("TRANSFERLAB_OFFLINE", "1")
        return transferlab.train(data, out=str(root / "run"), **options).run_dir
