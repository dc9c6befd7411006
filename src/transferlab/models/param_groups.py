"""Freezing and discriminative learning rates, by backbone block, for any architecture.

A backbone is cut into ordered blocks (input side first): timm models via their own ``group_matcher``
(the same grouping timm's layer-decay uses), other models (torchvision) by their module tree. The head
(:class:`~transferlab.models.heads.HeadSlot`) is never part of a block.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from transferlab.models.heads import HeadSlot, head_slot

__all__ = [
    "DECAY_RULES",
    "EXPAND",
    "backbone_blocks",
    "discriminative_param_groups",
    "freeze_backbone",
    "parse_decay",
    "unfreeze",
]

EXPAND: frozenset[str] = frozenset({"features", "layers", "blocks", "stages", "encoder", "trunk_output"})
"""Child names whose own children are blocks (torchvision: VGG/EfficientNet ``features``, ViT ``encoder``
and ``encoder.layers``, RegNet ``trunk_output``...)."""

Block = tuple[str, list[str]]


# ------------------------------------------------------------------------------------------ blocks


def _head_param_ids(model: nn.Module) -> set[int]:
    return {id(p) for m in model.modules() if isinstance(m, HeadSlot) for p in m.parameters()}


def _block_name(names: list[str]) -> str:
    """Readable name of a param group: the common module path per top-level child, joined by '+'
    (e.g. 'layer1.0', 'conv1+bn1', 'blocks.11+norm')."""
    by_top: dict[str, list[list[str]]] = {}
    for n in names:
        parts = n.split(".")
        by_top.setdefault(parts[0], []).append(parts[:-1] or parts)
    return "+".join(".".join(os.path.commonprefix(group)) or top for top, group in by_top.items())


def _timm_blocks(model: nn.Module, named: list[tuple[str, Any]]) -> list[Block] | None:
    try:
        matcher = model.group_matcher(coarse=False)
    except (NotImplementedError, TypeError, AttributeError):
        return None
    from timm.models._manipulate import group_with_matcher

    groups = group_with_matcher(named, matcher)
    blocks = [(_block_name(names), list(names)) for _, names in sorted(groups.items()) if names]
    return _unique_names(blocks)


def _unique_names(blocks: list[Block]) -> list[Block]:
    seen: dict[str, int] = {}
    out = []
    for name, params in blocks:
        count = seen.get(name, 0)
        seen[name] = count + 1
        out.append((name if count == 0 else f"{name}#{count}", params))
    return out


def _generic_blocks(model: nn.Module, head_ids: set[int]) -> list[Block]:
    """Top-level children in order; EXPAND-named children and the head's containers split one level;
    a leading run of leaf modules (ResNet conv1+bn1) merges into 'stem'; later runs of leaves merge too
    when the same level also has containers (so VGG's flat ``features`` keeps one block per conv)."""
    slot_paths = [n for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, HeadSlot)]
    expand_paths = {".".join(p.split(".")[:i]) for p in slot_paths for i in range(1, p.count(".") + 1)}
    assigned: set[int] = set(head_ids)

    def take(module: nn.Module, prefix: str, recurse: bool) -> list[str]:
        names = []
        for pname, param in module.named_parameters(prefix=prefix, recurse=recurse):
            if id(param) not in assigned:
                assigned.add(id(param))
                names.append(pname)
        return names

    def visit(module: nn.Module, prefix: str) -> list[Block]:
        dotted = f"{prefix}." if prefix else ""
        own = take(module, prefix, recurse=False)
        # entries: ("block", name, params, is_leaf) or ("expanded", blocks)
        entries: list[tuple[str, Any, Any, bool]] = []
        for cname, child in module.named_children():
            path = dotted + cname
            if isinstance(child, HeadSlot):
                continue
            if cname in EXPAND or path in expand_paths:
                entries.append(("expanded", visit(child, path), None, False))
            else:
                is_leaf = not any(True for _ in child.children())
                entries.append(("block", path, take(child, path, recurse=True), is_leaf))
        has_container = any(kind == "expanded" or not is_leaf for kind, _, _, is_leaf in entries)
        blocks: list[Block] = []
        run: list[tuple[str, list[str]]] = []
        leading = True

        def flush() -> None:
            with_params = [(n, p) for n, p in run if p]
            if with_params:
                if leading and has_container:
                    name = f"{dotted}stem"
                else:
                    name = "+".join(n for n, _ in with_params)
                blocks.append((name, [p for _, ps in with_params for p in ps]))
            run.clear()

        for kind, a, b, is_leaf in entries:
            if kind == "block" and is_leaf and has_container:
                run.append((a, b))
                continue
            flush()
            leading = False
            if kind == "expanded":
                blocks.extend(a)
            elif b:
                blocks.append((a, b))
        flush()
        if own:
            if blocks:
                blocks[0] = (blocks[0][0], own + blocks[0][1])
            else:
                blocks.append((prefix or "stem", own))
        return blocks

    return _unique_names(visit(model, ""))


def backbone_blocks(model: nn.Module) -> list[Block]:
    """Ordered input -> output, head excluded: [(block_name, [param names])].

    Every non-head parameter (frozen or not) is in exactly one block.
    """
    head_ids = _head_param_ids(model)
    named = [(n, p) for n, p in model.named_parameters() if id(p) not in head_ids]
    blocks = None
    if callable(getattr(model, "group_matcher", None)):
        blocks = _timm_blocks(model, named)
    if blocks is None:
        blocks = _generic_blocks(model, head_ids)
    return blocks


# ------------------------------------------------------------------------------------------ freezing


def _set_trainable(params: Iterable[nn.Parameter], trainable: bool) -> None:
    for p in params:
        p.requires_grad_(trainable)


def freeze_backbone(model: nn.Module) -> None:
    """requires_grad False on every non-head parameter; the head stays trainable.

    Batch-norm running statistics still update in train mode: call ``eval()`` on frozen parts if needed.
    """
    head_ids = _head_param_ids(model)
    for p in model.parameters():
        p.requires_grad_(id(p) in head_ids)


def unfreeze(model: nn.Module, last_k: int | None = None) -> None:
    """Make all blocks trainable (``last_k=None``) or only the last ``last_k``; the head always is."""
    if last_k is None:
        _set_trainable(model.parameters(), True)
        return
    if last_k < 0:
        raise ValueError(f"last_k must be >= 0 or None, got {last_k}")
    blocks = backbone_blocks(model)
    params = dict(model.named_parameters())
    freeze_backbone(model)
    for _, names in blocks[len(blocks) - last_k :] if last_k else []:
        _set_trainable((params[n] for n in names), True)
    _set_trainable(head_slot(model).parameters(), True)


# ------------------------------------------------------------------------------------------- decay


def _none(lr: float, n: int, value: float | None) -> list[float]:
    return [lr] * n


def _exp(lr: float, n: int, factor: float | None) -> list[float]:
    # top block gets lr, each block further toward the input lr / factor more
    return [lr / factor ** (n - 1 - i) for i in range(n)]


def _linear(lr: float, n: int, low: float | None) -> list[float]:
    if low > lr:
        raise ValueError(f"linear decay: the lowest lr ({low:g}) must not exceed the base lr ({lr:g})")
    if n == 1:
        return [lr]
    return [low + (lr - low) * i / (n - 1) for i in range(n)]


def _layer(lr: float, n: int, decay: float | None) -> list[float]:
    # timm layer decay: head lr, block at depth k from the top (k=1..n) gets lr * decay**k
    return [lr * decay ** (n - i) for i in range(n)]


DECAY_RULES: dict[str, Callable[[float, int, float | None], list[float]]] = {
    "none": _none,
    "exp": _exp,
    "linear": _linear,
    "layer": _layer,
}
"""name -> (base lr, number of blocks, parameter) -> per-block lrs, input side first."""

_DECAY_HELP = (
    "valid forms: 'none', 'exp:F' (each block toward the input gets lr/F, F >= 1, e.g. exp:3), "
    "'linear:LOW' (lr falls linearly to LOW at the first block, e.g. linear:1e-7), "
    "'layer:D' (timm layer decay, 0 < D <= 1, e.g. layer:0.75)"
)


def parse_decay(decay: str) -> tuple[str, float | None]:
    """'none' | 'exp:3' | 'linear:1e-7' | 'layer:0.75' -> (kind, value); ValueError otherwise."""
    text = (decay or "none").strip().lower()
    kind, sep, raw = text.partition(":")
    kind = kind.strip()
    if kind not in DECAY_RULES:
        raise ValueError(f"Unknown lr decay {decay!r}; {_DECAY_HELP}")
    if kind == "none":
        if sep:
            raise ValueError(f"lr decay 'none' takes no value (got {decay!r}); {_DECAY_HELP}")
        return "none", None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"lr decay {decay!r} needs a number after '{kind}:'; {_DECAY_HELP}") from None
    if not math.isfinite(value):
        raise ValueError(f"lr decay {decay!r} must be finite; {_DECAY_HELP}")
    if kind == "exp" and value < 1:
        raise ValueError(f"exp decay factor must be >= 1 (got {value:g}; for 0<D<1 use layer:{value:g})")
    if kind == "linear" and value < 0:
        raise ValueError(f"linear decay lowest lr must be >= 0, got {value:g}")
    if kind == "layer" and not 0 < value <= 1:
        raise ValueError(f"layer decay must be in (0, 1], got {value:g}")
    return kind, value


def _no_decay_names(model: nn.Module) -> set[str]:
    getter = getattr(model, "no_weight_decay", None)
    try:
        return set(getter()) if callable(getter) else set()
    except (TypeError, NotImplementedError):
        return set()


def discriminative_param_groups(
    model: nn.Module,
    lr: float,
    decay: str = "none",
    *,
    weight_decay: float = 0.0,
    last_k: int | None = None,
    floor_lr: float | None = None,
) -> list[dict[str, Any]]:
    """torch optimizer param groups: head first (lr), then blocks from the top down with decayed lrs.

    Frozen parameters are left out, and with ``last_k`` so are all blocks but the last ``last_k`` (lrs
    still depend on each block's position in the full backbone) — unless ``floor_lr`` is given: then
    those blocks train at ``floor_lr`` (the classic recipes' "parameters not given an LR get 1e-8"). With ``weight_decay`` > 0, 1-D
    parameters (biases, norms) and the model's ``no_weight_decay()`` names get no decay (as in timm).
    Each group has ``name`` (block name), ``lr``, ``lr_scale`` (lr / base lr) and ``weight_decay``.
    """
    kind, value = parse_decay(decay)
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    blocks = backbone_blocks(model)
    lrs = DECAY_RULES[kind](lr, len(blocks), value) if blocks else []
    if last_k is not None:
        if last_k < 0:
            raise ValueError(f"last_k must be >= 0 or None, got {last_k}")
        start = len(blocks) - last_k if last_k else len(blocks)
        if floor_lr is None:
            blocks, lrs = blocks[start:], lrs[start:]
        else:
            lrs = [floor_lr] * start + lrs[start:]
    params = dict(model.named_parameters())
    no_decay = _no_decay_names(model)
    slot_ids = _head_param_ids(model)
    head_names = [n for n, p in params.items() if id(p) in slot_ids]

    ordered = [("head", head_names, lr)] + [(name, names, r) for (name, names), r in reversed(list(zip(blocks, lrs)))]
    groups: list[dict[str, Any]] = []
    for name, names, group_lr in ordered:
        trainable = [n for n in names if params[n].requires_grad]
        if weight_decay > 0:
            split = {
                weight_decay: [n for n in trainable if params[n].ndim > 1 and n not in no_decay],
                0.0: [n for n in trainable if params[n].ndim <= 1 or n in no_decay],
            }
        else:
            split = {0.0: trainable}
        for wd, selected in split.items():
            if selected:
                groups.append(
                    {
                        "params": [params[n] for n in selected],
                        "lr": group_lr,
                        "lr_scale": group_lr / lr,
                        "weight_decay": wd,
                        "name": name,
                    }
                )
    return groups
