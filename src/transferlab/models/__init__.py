"""Backbones (offline-first), head replacement for any architecture, freezing and discriminative lrs."""

from transferlab.models.heads import (
    HeadConfig,
    HeadNotFound,
    HeadSlot,
    build_classifier,
    features_only,
    find_head,
    head_slot,
    replace_head,
)
from transferlab.models.param_groups import (
    backbone_blocks,
    discriminative_param_groups,
    freeze_backbone,
    parse_decay,
    unfreeze,
)
from transferlab.models.registry import (
    BackboneSpec,
    create_backbone,
    is_online,
    list_backbones,
    offline_backbones,
    resolve_backbone,
)

__all__ = [
    "BackboneSpec",
    "HeadConfig",
    "HeadNotFound",
    "HeadSlot",
    "backbone_blocks",
    "build_classifier",
    "create_backbone",
    "discriminative_param_groups",
    "features_only",
    "find_head",
    "freeze_backbone",
    "head_slot",
    "is_online",
    "list_backbones",
    "offline_backbones",
    "parse_decay",
    "replace_head",
    "resolve_backbone",
    "unfreeze",
]
