"""The split names transferlab uses, and the folder, shard-folder and CSV names that mean them: one table
for every reader (data/sources.py, data/shards.py, evaluation/samples.py)."""

from __future__ import annotations

__all__ = ["SPLITS", "SPLIT_ALIASES", "split_folder_names"]

SPLITS: tuple[str, ...] = ("train", "val", "test")
SPLIT_ALIASES: dict[str, str] = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
"""A folder's or CSV cell's name (lower-cased) → the split it holds."""


def split_folder_names(split: str) -> tuple[str, ...]:
    """The names a folder holding `split` may have, the canonical one first."""
    return tuple(alias for alias, name in SPLIT_ALIASES.items() if name == split)
