"""Replace the classifier of ANY architecture in place, leaving every backbone weight untouched.

The original classifier module is swapped for a :class:`HeadSlot`. Because the slot sits exactly where
the classifier was, the architecture's own ``forward`` keeps working (pooling, dropout, flatten, token
selection all stay as the authors wrote them), and flipping ``slot.bypass`` turns the same forward into
a feature extractor. That is how frozen features are computed for every model without knowing its
forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
from torch import nn

from transferlab.errors import BackboneUnavailable
from transferlab.models.registry import BackboneSpec, create_backbone

__all__ = [
    "HEADS",
    "HeadConfig",
    "HeadNotFound",
    "HeadSlot",
    "build_classifier",
    "features_only",
    "find_head",
    "head_slot",
    "replace_head",
]


class HeadNotFound(BackboneUnavailable):
    """The classifier of a model cannot be located (or replaced) automatically."""


# ------------------------------------------------------------------------------------------- heads


def _linear_head(in_features: int, num_classes: int, cfg: HeadConfig) -> nn.Module:
    layers: list[nn.Module] = [nn.Dropout(cfg.dropout)] if cfg.dropout > 0 else []
    return nn.Sequential(*layers, nn.Linear(in_features, num_classes))


def _mlp_head(in_features: int, num_classes: int, cfg: HeadConfig) -> nn.Module:
    return nn.Sequential(
        nn.Linear(in_features, cfg.hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(cfg.dropout),
        nn.Linear(cfg.hidden, num_classes),
    )


HEADS: dict[str, Callable[[int, int, HeadConfig], nn.Module]] = {"linear": _linear_head, "mlp": _mlp_head}
"""Head builders by kind: (in_features, num_classes, config) -> module mapping [B, in] to [B, N]."""


@dataclass
class HeadConfig:
    """The new classifier put on top of a backbone."""

    kind: str = "linear"  # a key of HEADS: "linear" | "mlp"
    hidden: int = 512  # mlp only
    dropout: float = 0.2  # before the (last) linear layer; linear heads skip it when 0

    def __post_init__(self) -> None:
        if self.kind not in HEADS:
            raise ValueError(f"Unknown head kind {self.kind!r}; valid: {', '.join(HEADS)}")
        if int(self.hidden) < 1:
            raise ValueError(f"Head hidden size must be >= 1, got {self.hidden}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"Head dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HeadConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown head config field(s): {', '.join(unknown)}")
        return cls(**dict(data))


class HeadSlot(nn.Module):
    """Replaces the original classifier module in place.

    Holds a parameter-free ``pre`` (e.g. pooling + flatten where the original classifier was a 1x1 conv,
    as in SqueezeNet) and the new ``head``. With ``bypass`` True it returns the features (``pre(x)``
    flattened to [B, in_features]) instead of logits: that is how frozen features are extracted from any
    architecture without knowing its forward.
    """

    def __init__(
        self, in_features: int, num_classes: int, config: HeadConfig | None = None, pre: nn.Module | None = None
    ) -> None:
        super().__init__()
        config = config or HeadConfig()
        self.in_features = int(in_features)
        self.num_classes = int(num_classes)
        self.config = config
        self.pre = pre if pre is not None else nn.Identity()
        if any(True for _ in self.pre.parameters()):
            raise ValueError("HeadSlot.pre must be parameter-free (its output defines the features)")
        self.head = HEADS[config.kind](self.in_features, self.num_classes, config)
        self.bypass = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        if self.bypass:
            return x.flatten(1) if x.ndim > 2 else x
        return self.head(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}, bypass={self.bypass}"


# ---------------------------------------------------------------------------------------- locating


def _has_own_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def _slot_paths(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, HeadSlot)]


def _timm_classifier_paths(model: nn.Module) -> list[str]:
    cfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(cfg, Mapping):
        return []
    classifier = cfg.get("classifier")
    paths = [classifier] if isinstance(classifier, str) else list(classifier or ())
    valid = []
    for path in paths:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            return []
        if not any(True for _ in module.parameters()):
            return []  # e.g. num_classes=0 -> Identity: nothing to replace
        valid.append(path)
    return valid


def _parent_path(path: str) -> str:
    return path.rpartition(".")[0]


def _generic_head(model: nn.Module) -> str:
    """Last leaf module with parameters, in registration order; a 1x1 conv means its parent container."""
    last_name, last = None, None
    for name, module in model.named_modules():
        if name and not any(True for _ in module.children()) and _has_own_params(module):
            last_name, last = name, module
    if last is None:
        raise HeadNotFound(
            f"{type(model).__name__} has no parameterised layers, so it has no classifier to replace."
        )
    if isinstance(last, nn.Linear):
        return last_name
    if isinstance(last, nn.Conv2d) and tuple(last.kernel_size) == (1, 1):
        return _parent_path(last_name) or last_name
    raise HeadNotFound(
        f"Cannot tell which module is the classifier of {type(model).__name__}: its last layer "
        f"'{last_name}' is a {type(last).__name__}, not a Linear or 1x1 Conv2d. "
        "Pass path=... to replace_head to name it explicitly."
    )


def find_head(model: nn.Module) -> str:
    """Dotted path of the classifier module to replace (an existing HeadSlot if already replaced).

    timm models: ``pretrained_cfg['classifier']`` (first entry when it is a tuple, e.g. distilled
    models; the others share the same slot, see :func:`replace_head`). Otherwise the last
    parameterised leaf (Linear), or the container of a final 1x1 Conv2d (SqueezeNet's ``classifier``).
    """
    slots = _slot_paths(model)
    if slots:
        return slots[0]
    timm_paths = _timm_classifier_paths(model)
    if timm_paths:
        return timm_paths[0]
    return _generic_head(model)


# --------------------------------------------------------------------------------------- replacing


def _describe(module: nn.Module) -> tuple[int, nn.Module | None]:
    """(in_features, pre) for the module being replaced; pre None means identity."""
    if isinstance(module, HeadSlot):
        return module.in_features, module.pre
    if isinstance(module, nn.Linear):
        return module.in_features, None
    if isinstance(module, nn.Conv2d):
        return module.in_channels, nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    leaves = [m for m in module.modules() if not any(True for _ in m.children())]
    weighted = [m for m in leaves if _has_own_params(m)]
    if weighted and isinstance(weighted[-1], (nn.Linear, nn.Conv2d)) and len(weighted) == 1:
        kept = [nn.Dropout(m.p) for m in leaves if isinstance(m, nn.Dropout)]  # keep the author's dropout
        if isinstance(weighted[-1], nn.Linear):
            return weighted[-1].in_features, nn.Sequential(*kept) if kept else None
        pool = [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]
        return weighted[-1].in_channels, nn.Sequential(*kept, *pool)
    raise HeadNotFound(
        f"Cannot replace classifier module {type(module).__name__}: expected a Linear, a 1x1 Conv2d, or a "
        "container holding exactly one of them. Pass path=... to replace_head to name another module."
    )


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, module)


def replace_head(
    model: nn.Module, num_classes: int, head: HeadConfig | None = None, *, path: str | None = None
) -> HeadSlot:
    """Swap the classifier (found by :func:`find_head`, or ``path``) for a new :class:`HeadSlot`, in place.

    Backbone weights are untouched; the new head is on the old classifier's device/dtype. Calling it
    again replaces the head of the existing slot. For timm models with several classifiers of the same
    width (distilled DeiT: ``head`` + ``head_dist``) all point at ONE shared slot, so the model's own
    averaging still works and features are the averaged tokens.
    """
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    head = head or HeadConfig()
    if path is None:
        existing = _slot_paths(model)
        paths = existing or _timm_classifier_paths(model) or [_generic_head(model)]
    else:
        paths = [path]
    try:
        old = model.get_submodule(paths[0])
    except AttributeError:
        raise HeadNotFound(f"{type(model).__name__} has no submodule '{paths[0]}'.") from None
    in_features, pre = _describe(old)
    for extra in paths[1:]:
        extra_module = model.get_submodule(extra)
        extra_in = extra_module.in_features if isinstance(extra_module, HeadSlot) else _describe(extra_module)[0]
        if extra_in != in_features:
            raise HeadNotFound(
                f"{type(model).__name__} has several classifiers of different widths ({', '.join(paths)}); "
                "replacing them with one head is not supported. Choose another backbone."
            )
    slot = HeadSlot(in_features, num_classes, head, pre=pre)
    reference = next(old.parameters(), None)
    if reference is not None:
        slot = slot.to(device=reference.device, dtype=reference.dtype)
    for p in paths:
        _set_submodule(model, p, slot)
    if isinstance(getattr(model, "num_classes", None), int):
        model.num_classes = int(num_classes)  # timm models report it
    return slot


def head_slot(model: nn.Module) -> HeadSlot:
    """The model's HeadSlot (e.g. after loading a saved classifier)."""
    for module in model.modules():
        if isinstance(module, HeadSlot):
            return module
    raise HeadNotFound(f"{type(model).__name__} has no HeadSlot; call replace_head(model, num_classes) first.")


@contextmanager
def features_only(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, ``model(x)`` returns [B, in_features] features instead of logits.

    Only the head is bypassed; train/eval mode is the caller's business (use eval() for stable
    features: dropout and batch-norm behave as in training otherwise).
    """
    slot = head_slot(model)
    previous = slot.bypass
    slot.bypass = True
    try:
        yield model
    finally:
        slot.bypass = previous


def build_classifier(
    spec: BackboneSpec, num_classes: int, head: HeadConfig | None = None, *, load_weights: bool = True
) -> nn.Module:
    """Backbone from ``spec`` with a new head for ``num_classes``.

    ``load_weights=False`` builds the same architecture with random init and no download, for when a
    saved state dict is loaded next. ``model.backbone_spec`` is always the given ``spec``.
    """
    build_spec = spec if load_weights or not spec.pretrained else replace(spec, pretrained=False)
    model = create_backbone(build_spec)
    replace_head(model, num_classes, head)
    model.backbone_spec = spec
    model.preprocessing = spec.preprocessing
    return model
