"""How transferlab names and places files: its home folder, slugs for names it makes, and which
listed files are not the user's."""

from __future__ import annotations

import os
import re
from pathlib import Path

# Anything but letters, digits, "_", "." and "-" could be a path separator, a shell metacharacter or
# unprintable; non-ASCII letters are kept so that class and data names stay readable.
_UNSAFE = re.compile(r"[^\w.-]+")

# Resource forks and metadata that macOS leaves in zip archives and copied folders.
_SYSTEM_NAMES = frozenset({"__MACOSX"})


def home() -> Path:
    """``$TRANSFERLAB_HOME``, defaulting to ``~/.cache/transferlab``: where caches and datasets live."""
    return Path(os.environ.get("TRANSFERLAB_HOME") or "~/.cache/transferlab").expanduser()


def slug(text: str, fallback: str = "") -> str:
    """`text` made safe as one file or folder name: each run of other characters becomes "-", and no
    leading "." hides the result; `fallback` when nothing is left."""
    return _UNSAFE.sub("-", text).strip("-.") or fallback


def is_hidden(name: str | Path) -> bool:
    """A dot-file or a macOS metadata folder: listed on disk, but never the user's data."""
    name = Path(name).name
    return name.startswith(".") or name in _SYSTEM_NAMES


def hidden_under(path: Path, root: Path) -> bool:
    """`path`, found below `root`, is hidden or lies in a hidden folder on the way down."""
    return any(is_hidden(part) for part in path.relative_to(root).parts)
