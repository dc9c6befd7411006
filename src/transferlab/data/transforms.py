"""Image -> tensor pipelines: one deterministic eval transform and named augmentation presets.

The preprocessing a model was trained with is recorded as a :class:`Preprocessing` and saved
with the run, so prediction and export reproduce it exactly. Built on torchvision
``transforms.v2``; augmentation happens on the PIL image, before tensor conversion.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import v2

from transferlab.data.images import resized_short_side

__all__ = [
    "AUGMENT_PRESETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INTERPOLATIONS",
    "EvalView",
    "Preprocessing",
    "Transform",
    "eval_transform",
    "eval_view",
    "train_transform",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

INTERPOLATIONS: dict[str, v2.InterpolationMode] = {
    "nearest": v2.InterpolationMode.NEAREST,
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
}
CROP_MODES: tuple[str, ...] = ("center", "squash")
# The largest input side any model is built or fed at. The largest pretrained configs (timm) are 800 px;
# one 4096 px image is 200 MB of float32 already, and a model.json claiming 20000 px would allocate GBs
# in the first probe pass, so a larger size is refused as a damaged or hostile file, not attempted.
MAX_INPUT_SIZE = 4096

Transform = Callable[[Image.Image], torch.Tensor]


@dataclass(frozen=True)
class Preprocessing:
    """How images are resized and normalised for one backbone; saved with each run."""

    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    crop_mode: str = "center"  # "center" | "squash"

    def __post_init__(self) -> None:
        if not isinstance(self.input_size, numbers.Integral) or isinstance(self.input_size, bool) or not (
                1 <= self.input_size <= MAX_INPUT_SIZE):
            raise ValueError(
                f"input_size must be an integer from 1 to {MAX_INPUT_SIZE}, got {self.input_size!r}"
            )
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"Unknown interpolation {self.interpolation!r}; valid: {', '.join(INTERPOLATIONS)}"
            )
        if self.crop_mode not in CROP_MODES:
            raise ValueError(
                f"Unknown crop_mode {self.crop_mode!r}; valid: {', '.join(CROP_MODES)}"
            )
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std must have three (RGB) values each")
        # JSON round-trips give lists; keep the dataclass hashable and comparable.
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, stored in the run directory."""
        data = asdict(self)
        data["mean"] = list(self.mean)
        data["std"] = list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessing:
        """Inverse of :meth:`to_dict`; missing keys take defaults, unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown preprocessing field(s): {', '.join(unknown)}")
        return cls(**dict(data))

    def with_size(self, size: int) -> Preprocessing:
        """Same preprocessing at another input resolution (e.g. fine-tuning at higher res)."""
        return replace(self, input_size=size)


def _scale_and_normalize(pre: Preprocessing) -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(pre.mean), std=list(pre.std))]


def _to_normalized_tensor(pre: Preprocessing) -> list[v2.Transform]:
    return [v2.ToImage(), *_scale_and_normalize(pre)]


class ResizeShortSide(v2.Resize):
    """``v2.Resize(short)`` that first checks what it would make (``images.resized_short_side``): a thin
    image whose resized size exceeds the pixel limit is an :class:`ImageError`, raised before resizing."""

    def __init__(self, short: int, interpolation) -> None:
        super().__init__(short, interpolation=interpolation)
        self.short = short

    def forward(self, *inputs: Any) -> Any:
        image = inputs[0] if len(inputs) == 1 else inputs
        height, width = v2.functional.get_size(image)
        resized_short_side(width, height, self.short)
        return super().forward(*inputs)


def _resize(pre: Preprocessing) -> list[v2.Transform]:
    interpolation = INTERPOLATIONS[pre.interpolation]
    size = pre.input_size
    if pre.crop_mode == "squash":
        return [v2.Resize((size, size), interpolation=interpolation)]
    return [
        ResizeShortSide(int(size / pre.crop_pct), interpolation),
        v2.CenterCrop(size),
    ]


def eval_transform(pre: Preprocessing) -> Transform:
    """Deterministic resize/crop + normalise: used for validation, test, prediction, export."""
    return v2.Compose([*_resize(pre), *_to_normalized_tensor(pre), v2.ToPureTensor()])


EvalView = tuple[str, Transform, Callable[[torch.Tensor], torch.Tensor]]
"""``(key, pixels, to_input)``: see :func:`eval_view`."""


def eval_view(pre: Preprocessing) -> EvalView:
    """:func:`eval_transform` cut where its output is still uint8 pixels: ``(key, pixels, to_input)``,
    with ``to_input(pixels(image))`` exactly ``eval_transform(pre)(image)`` and `key` naming the cut, so
    the uint8 half (a quarter of the float tensor's bytes) can be kept for images evaluated every epoch."""
    key = "eval:" + json.dumps(pre.to_dict(), sort_keys=True)
    return (key, v2.Compose([*_resize(pre), v2.ToImage(), v2.ToPureTensor()]),
            v2.Compose([*_scale_and_normalize(pre), v2.ToPureTensor()]))


def _random_crop_flip(pre: Preprocessing, min_scale: float) -> list[v2.Transform]:
    return [
        v2.RandomResizedCrop(
            pre.input_size,
            scale=(min_scale, 1.0),
            interpolation=INTERPOLATIONS[pre.interpolation],
        ),
        v2.RandomHorizontalFlip(),
    ]


def _light(pre: Preprocessing) -> Transform:
    return v2.Compose(
        [*_random_crop_flip(pre, 0.6), *_to_normalized_tensor(pre), v2.ToPureTensor()]
    )


def _standard_geometry_and_colour(pre: Preprocessing) -> list[v2.Transform]:
    return [
        *_random_crop_flip(pre, 0.35),
        v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05),
        v2.RandomAffine(degrees=15, shear=10),
    ]


def _standard(pre: Preprocessing) -> Transform:
    return v2.Compose(
        [
            *_standard_geometry_and_colour(pre),
            *_to_normalized_tensor(pre),
            v2.ToPureTensor(),
        ]
    )


def _strong(pre: Preprocessing) -> Transform:
    return v2.Compose(
        [
            *_standard_geometry_and_colour(pre),
            v2.TrivialAugmentWide(interpolation=INTERPOLATIONS[pre.interpolation]),
            *_to_normalized_tensor(pre),
            v2.RandomErasing(p=0.25),
            v2.ToPureTensor(),
        ]
    )


def _classic(pre: Preprocessing) -> Transform:
    """The classic tutorials' recipe (Flowers-102): the eval framing, then colour jitter, h-flip,
    rotation and shear — no random crop."""
    return v2.Compose(
        [
            *_resize(pre),
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05),
            v2.RandomHorizontalFlip(),
            v2.RandomRotation(15, interpolation=INTERPOLATIONS[pre.interpolation]),
            v2.RandomAffine(degrees=0, shear=10, interpolation=INTERPOLATIONS[pre.interpolation]),
            *_to_normalized_tensor(pre),
            v2.ToPureTensor(),
        ]
    )


def _padcrop(pre: Preprocessing) -> Transform:
    """CIFAR/STL-style: the eval framing, then RandomCrop(size, padding=4) and h-flip."""
    return v2.Compose(
        [
            *_resize(pre),
            v2.RandomCrop(pre.input_size, padding=4),
            v2.RandomHorizontalFlip(),
            *_to_normalized_tensor(pre),
            v2.ToPureTensor(),
        ]
    )


AUGMENT_PRESETS: dict[str, Callable[[Preprocessing], Transform]] = {
    "none": eval_transform,
    "light": _light,
    "standard": _standard,
    "strong": _strong,
    "classic": _classic,
    "padcrop": _padcrop,
}
"""Training augmentation by name; small datasets overfit less with stronger presets."""


def train_transform(pre: Preprocessing, preset: str = "standard") -> Transform:
    """Training pipeline for ``preset``; validation data always uses :func:`eval_transform`."""
    try:
        build = AUGMENT_PRESETS[preset]
    except KeyError:
        raise ValueError(
            f"Unknown augmentation preset {preset!r}; valid: {', '.join(AUGMENT_PRESETS)}"
        ) from None
    return build(pre)
