"""Hostile inputs, flaky disks and slow clients (issue 20): each case a second round of attacks found,
held to its fix. Loopback only; tiny generated models and images."""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import pytest
import torch
from conftest import make_image_folder
from guarantees import cli

from transferlab.data import feature_cache
from transferlab.data.sources import load_splits
from transferlab.data.transforms import eval_transform
from transferlab.models.heads import HeadConfig, build_classifier
from transferlab.models.registry import resolve_backbone

# --- TorchScript export of the default backbone (timm's TF-'SAME' convolutions) -----------------------


def _untrained_run(root: Path, backbone: str, img_size: int) -> Path:
    """A run directory as `train` writes it, for `backbone` at random init: the export bug is in the
    architecture (its 'SAME'-padded convolutions), not in the weights."""
    from transferlab.training.run import model_metadata, save_model

    spec = resolve_backbone(backbone, pretrained=False, img_size=img_size)
    torch.manual_seed(0)
    head = HeadConfig()
    model = build_classifier(spec, 3, head, load_weights=False).eval()
    root.mkdir(parents=True)
    save_model(root, model, model_metadata(spec, head, ["a", "b", "c"], {}))
    return root


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_torchscript_export_of_each_offline_lite_passes_its_parity_check(tmp_path, backbone):
    run = _untrained_run(tmp_path / "run", backbone, img_size=33)  # odd: the asymmetric TF padding is used
    r = cli("export", run, "--format", "torchscript", "--dynamic-batch", "--parity-images", "2")
    assert r.code == 0, r.text
    sidecar = json.loads((run / "export" / "model.pt.json").read_text())
    assert sidecar["parity"]["passed"] and sidecar["parity"]["top1_identical"] == 2
    assert sidecar["source"]["backbone"] == backbone


# --- the feature cache checks its tensors' bytes, not only their key, shape and dtype -----------------


def _flip_feature_bytes(path: Path, how: str) -> None:
    """Damage the features' data in place, leaving the safetensors header (key, shape, dtype) intact."""
    raw = bytearray(path.read_bytes())
    header_len = struct.unpack("<Q", raw[:8])[0]
    start = 8 + header_len + json.loads(raw[8:8 + header_len])["features"]["data_offsets"][0]
    value = start + 4 * 5  # the sixth float of the first image
    if how == "NaN":
        raw[value:value + 4] = struct.pack("<f", float("nan"))
    else:  # "halved or doubled value": the lowest exponent bit of one float, a silent change of the metrics
        raw[value + 2] ^= 0x80
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["NaN", "halved or doubled value"])
def test_feature_cache_with_flipped_bytes_fails_its_checksum_and_is_rebuilt(tmp_path, caplog, how):
    data = make_image_folder(tmp_path / "data", per_class=(4, 2))
    samples = load_splits(data, progress=False).train
    spec = resolve_backbone("test_efficientnet", pretrained=False, img_size=32)
    model = build_classifier(spec, 2, HeadConfig()).eval()
    transform = eval_transform(spec.preprocessing)
    cache = tmp_path / "cache"

    def features():
        return feature_cache.cached_features(model, samples, transform, "eval:test", cache_dir=cache)

    fresh, hit = features()
    assert not hit
    (path,) = cache.glob("*.safetensors")
    _flip_feature_bytes(path, how)
    assert not torch.equal(feature_cache.load_tensors(path)["features"], fresh)  # the damage is there
    with caplog.at_level(logging.WARNING, logger="transferlab"):
        rebuilt, hit = features()
    assert not hit and torch.equal(rebuilt, fresh)
    assert f"feature cache {path.name} is corrupt (checksum mismatch" in caplog.text and "rebuilding" in caplog.text
    again, hit = features()  # the rebuilt file passes its checksum
    assert hit and torch.equal(again, fresh)


# --- a file deleted between the validation pass and training ---------------------------------------


def test_file_deleted_after_validation_is_skipped_and_listed_like_any_unreadable_file(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=(4, 2))
    splits = load_splits(data, progress=False)
    gone = splits.train[0].path
    gone.unlink()
    dropped = splits.drop_unreadable()
    assert dropped == [{"path": str(gone), "reason": "unreadable file: No such file or directory (after validation)"}]
    assert gone not in [s.path for s in splits.train] and len(splits.train) == 7
    assert splits.to_summary()["skipped"][-1] == dropped[0]
    assert splits.drop_unreadable() == []  # listed once


def test_file_deleted_before_the_feature_cache_hashes_it_never_stops_the_run(tmp_path, monkeypatch, caplog):
    """The feature pass hashes every file for its cache key: a file gone by then is hashed as unreadable
    (its cache entry apart from the file's) and read as the dataset reads a vanished file, never a crash."""
    import transferlab
    from conftest import TINY
    from transferlab.training import run as run_module

    data = make_image_folder(tmp_path / "data", per_class=(6, 2))
    gone = data / "train" / "red" / "red_0.png"

    def load_then_delete(*args, **kwargs):
        splits = load_splits(*args, **kwargs)
        gone.unlink(missing_ok=True)  # after the validation pass, before training
        return splits

    monkeypatch.setattr(run_module, "load_splits", load_then_delete)
    with caplog.at_level(logging.WARNING, logger="transferlab"):
        result = transferlab.train(data, out=str(tmp_path / "run"), **(TINY | {"epochs_finetune": 1}))
    assert (result.run_dir / "model.safetensors").exists()
    assert f"{gone}: unreadable file: No such file or directory" in caplog.text


# --- thin images: the pixel limit holds for what the resize would make, not only for the file --------


def thin_png(path: Path, width: int = 1, height: int = 100_000) -> Path:
    from PIL import Image

    Image.new("RGB", (width, height), (200, 40, 40)).save(path, optimize=True)
    return path


CENTRE_CROP = {"input_size": 32, "crop_pct": 0.875, "crop_mode": "center", "interpolation": "bilinear",
               "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}  # short side to 36: 1x100000 -> 36x3600000


def test_thin_image_is_refused_before_the_resize_in_every_decode_path(tmp_path, caplog):
    from transferlab.data.datasets import ImageDataset
    from transferlab.data.images import ImageError, load_image
    from transferlab.data.sources import Sample
    from transferlab.data.transforms import Preprocessing
    from transferlab.export.preprocess import preprocess_image

    path = thin_png(tmp_path / "thin.png")
    assert path.stat().st_size < 2000
    pre = Preprocessing(**CENTRE_CROP)
    image = load_image(path)  # 100 000 pixels: the file itself is within every limit
    reason = "resize bomb: 1x100000 pixels would be resized to 36x3600000 (over the limit of 89478485)"
    with pytest.raises(ImageError) as torch_path:  # eval, predict, evaluate, the report, training's classic crops
        eval_transform(pre)(image)
    assert torch_path.value.reason == reason
    with pytest.raises(ImageError) as numpy_path:  # exported models: predict and serve
        preprocess_image(image, pre.to_dict())
    assert numpy_path.value.reason == reason
    with caplog.at_level(logging.WARNING, logger="transferlab"):  # training: a black image, logged, no crash
        x, label = ImageDataset([Sample(path, 1)], eval_transform(pre))[0]
    assert tuple(x.shape) == (3, 32, 32) and label == 1 and reason in caplog.text
    # a merely long image (1 x 2000 -> 36 x 72000) is still used
    assert tuple(eval_transform(pre)(load_image(thin_png(tmp_path / "long.png", 1, 2000))).shape) == (3, 32, 32)


def test_serve_answers_a_thin_image_with_413_in_json(tmp_path, tiny_run):
    from fastapi.testclient import TestClient

    from transferlab.export.serve import create_app

    run = tmp_path / "run"
    import shutil

    shutil.copytree(tiny_run, run)
    meta = json.loads((run / "model.json").read_text())
    assert meta["preprocessing"]["crop_mode"] == "center"
    with TestClient(create_app(run)) as client:
        png = thin_png(tmp_path / "thin.png").read_bytes()
        response = client.post("/predict", files={"file": ("thin.png", png, "image/png")})
    assert response.status_code == 413
    assert "thin.png: resize bomb: 1x100000 pixels would be resized to" in response.json()["error"]
