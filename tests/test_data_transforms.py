"""Preprocessing record and image -> tensor pipelines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from transferlab.data.transforms import (
    AUGMENT_PRESETS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocessing,
    eval_transform,
    train_transform,
)


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _framed(size: int = 100, border: int = 10) -> Image.Image:
    """White square with a black frame: tells centre-cropping from squashing."""
    image = Image.new("RGB", (size, size), (0, 0, 0))
    image.paste((255, 255, 255), (border, border, size - border, size - border))
    return image


def test_preprocessing_defaults_are_imagenet():
    pre = Preprocessing()
    assert pre.input_size == 224
    assert pre.mean == IMAGENET_MEAN
    assert pre.std == IMAGENET_STD
    assert (pre.interpolation, pre.crop_pct, pre.crop_mode) == (
        "bicubic",
        0.875,
        "center",
    )


def test_preprocessing_round_trips_through_json():
    pre = Preprocessing(
        input_size=240, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_mode="squash"
    )
    restored = Preprocessing.from_dict(json.loads(json.dumps(pre.to_dict())))
    assert restored == pre
    assert isinstance(restored.mean, tuple)


def test_preprocessing_from_dict_fills_defaults_and_rejects_unknown_fields():
    assert Preprocessing.from_dict({"input_size": 32}) == Preprocessing(input_size=32)
    with pytest.raises(ValueError, match=r"Unknown preprocessing field.*colour"):
        Preprocessing.from_dict({"input_size": 32, "colour": "red"})


def test_with_size_changes_only_the_size():
    pre = Preprocessing(crop_pct=1.0, interpolation="bilinear")
    assert pre.with_size(384) == Preprocessing(
        input_size=384, crop_pct=1.0, interpolation="bilinear"
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_size": 0}, "input_size"),
        ({"crop_pct": 0.0}, "crop_pct"),
        ({"crop_pct": 1.5}, "crop_pct"),
        ({"interpolation": "lanczos9"}, "interpolation.*bicubic"),
        ({"crop_mode": "pad"}, "crop_mode.*squash"),
        ({"mean": (0.5, 0.5)}, "three"),
    ],
)
def test_invalid_preprocessing_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Preprocessing(**kwargs)


@pytest.mark.parametrize("crop_mode", ["center", "squash"])
def test_eval_transform_outputs_normalised_square_tensor(crop_mode):
    pre = Preprocessing(input_size=32, crop_mode=crop_mode)
    tensor = eval_transform(pre)(_noise(70, 40))
    assert type(tensor) is torch.Tensor
    assert tensor.shape == (3, 32, 32)
    assert tensor.dtype == torch.float32
    white = eval_transform(pre)(Image.new("RGB", (50, 50), (255, 255, 255)))
    expected = [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    assert torch.allclose(white.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-4)


def test_center_mode_crops_away_the_border_and_squash_keeps_it():
    black_in_imagenet_units = -IMAGENET_MEAN[0] / IMAGENET_STD[0]
    center = eval_transform(Preprocessing(input_size=40, crop_pct=0.5))(_framed())
    squash = eval_transform(Preprocessing(input_size=40, crop_mode="squash"))(_framed())
    assert center[0].min() > 2.0  # all white: resize to 80, crop the middle 40
    assert squash[0, 0, 0].item() == pytest.approx(black_in_imagenet_units, abs=0.05)


def test_eval_transform_is_deterministic():
    transform = eval_transform(Preprocessing(input_size=24))
    image = _noise(50, 30)
    assert torch.equal(transform(image), transform(image))


@pytest.mark.parametrize("preset", sorted(AUGMENT_PRESETS))
def test_every_preset_outputs_the_input_size(preset):
    torch.manual_seed(0)
    transform = train_transform(Preprocessing(input_size=48), preset)
    for image in [_noise(100, 60), _noise(30, 90), Image.new("RGB", (1, 1))]:
        tensor = transform(image)
        assert type(tensor) is torch.Tensor
        assert tensor.shape == (3, 48, 48)
        assert tensor.dtype == torch.float32


def test_none_preset_equals_eval_transform():
    pre = Preprocessing(input_size=32)
    image = _noise(64, 48)
    assert torch.equal(train_transform(pre, "none")(image), eval_transform(pre)(image))


@pytest.mark.parametrize("preset", ["light", "standard", "strong"])
def test_augmenting_presets_are_random(preset):
    torch.manual_seed(0)
    transform = train_transform(Preprocessing(input_size=32), preset)
    image = _noise(64, 64)
    assert not torch.equal(transform(image), transform(image))


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(
        ValueError,
        match=r"Unknown augmentation preset 'wild'.*none, light, standard, strong",
    ):
        train_transform(Preprocessing(), "wild")
