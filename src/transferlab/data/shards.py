"""WebDataset-format tar shards as a data source, read in place — never unpacked to loose files.

A shard is a plain tar whose members are grouped by key: ``0000042.jpg`` + ``0000042.cls``
(the class number as text) and/or ``0000042.json`` (``{"label": "cat"}``). Millions of small
files are what make big image sets slow to copy, list and open; a few hundred large tars are not.

Each shard is indexed once per process by a scan of its tar headers (member name → offset, size);
an image is then one seek and one read. So every sample stays addressable: the epoch sampler
shuffles and shards over processes exactly as for folders, a run resumes mid-way, and the feature
cache keys on the image bytes — the same design as WebDataset's own indexed ``wids`` mode.

A sample's path is the shard's path followed by the member name (``shards/train-000000.tar/0000042.jpg``):
opening it as a file fails with NotADirectoryError, and `member_bytes` serves it instead.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from transferlab.data.images import has_image_extension
from transferlab.data.splits import SPLIT_ALIASES
from transferlab.data.storage import SHARD_SUFFIX, member_bytes, shard_index
from transferlab.errors import DataError
from transferlab.paths import is_hidden

log = logging.getLogger("transferlab")

_BRACES = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """``shards/{000..003}.tar`` → four names, ``{a,b}`` → two (WebDataset's shard-list syntax);
    zero-padding of ranges is kept."""
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    head, tail = pattern[: match.start()], pattern[match.end():]
    if ".." in body and "," not in body:
        lo, hi = body.split("..", 1)
        if not (lo.isdigit() and hi.isdigit()):
            raise DataError(f"Bad shard range {{{body}}} in {pattern}: expected e.g. {{000..099}}.")
        width = len(lo) if lo.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [name for option in options for name in expand_braces(head + option + tail)]


def is_shard_source(data: str | Path) -> bool:
    """True for a .tar file, a brace/glob pattern of them, or a folder whose shards (directly, or
    in train/ val/ test/ sub-folders) stand in for images."""
    text = str(data)
    if _BRACES.search(text) or any(c in text for c in "*?["):
        return text.endswith(SHARD_SUFFIX)
    path = Path(text).expanduser()
    if path.is_file():
        return path.suffix.lower() == SHARD_SUFFIX
    if not path.is_dir():
        return False
    folders = [path] + [p for p in _children(path) if p.is_dir() and p.name.lower() in SPLIT_ALIASES]
    return any(_shards_in(folder) for folder in folders)


def _children(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError:
        return []


def _shards_in(folder: Path) -> list[Path]:
    return [p for p in _children(folder) if p.is_file() and p.suffix.lower() == SHARD_SUFFIX and not is_hidden(p)]


def shard_lists(data: str | Path) -> dict[str, list[Path]]:
    """Split → shard files. Split folders name their split; anything else is training data (the
    validation set is then held out of it by --val-split, as for class folders)."""
    text = str(data)
    if _BRACES.search(text) or any(c in text for c in "*?["):
        names = [n for brace in expand_braces(text) for n in _glob(brace)]
        missing = [n for n in names if not Path(n).is_file()]
        if missing:
            raise DataError(f"Shard(s) not found: {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}.")
        return {"train": [Path(n).absolute() for n in names]}
    path = Path(text).expanduser().absolute()
    if path.is_file():
        return {"train": [path]}
    lists: dict[str, list[Path]] = {}
    for child in _children(path):
        split = SPLIT_ALIASES.get(child.name.lower())
        if split and child.is_dir() and _shards_in(child) and split not in lists:
            lists[split] = _shards_in(child)
    if lists and "train" not in lists:
        raise DataError(f"{path} has {', '.join(sorted(lists))} shards but no train/ shards.")
    if not lists:
        lists["train"] = _shards_in(path)
    return lists


def _glob(pattern: str) -> list[str]:
    if not any(c in pattern for c in "*?["):
        return [pattern]
    anchor = Path(pattern)
    parts = anchor.parts
    root = Path(anchor.anchor) if anchor.is_absolute() else Path(".")
    relative = str(Path(*parts[1:])) if anchor.is_absolute() else pattern
    return sorted(str(p) for p in root.glob(relative))


@dataclass
class ShardRead:
    """What the shards hold: split → [(member path, class name)], and what could not be used."""

    files: dict[str, list[tuple[Path, str]]] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)


def read_shards(data: str | Path) -> ShardRead:
    """Index every shard and pair each key's image with its label."""
    result = ShardRead()
    for split, shards in shard_lists(data).items():
        files = result.files.setdefault(split, [])
        for shard in shards:
            files.extend(_labelled_images(shard, result.skipped))
    return result


def _labelled_images(shard: Path, skipped: list[dict[str, str]]) -> Iterable[tuple[Path, str]]:
    groups: dict[str, dict[str, str]] = {}
    for name in shard_index(shard):
        if _escapes(name):
            # `shard / name` would leave the shard: an absolute name replaces it, so the "member" would be
            # read from that path on this disk (WebDataset and tarfile's data filter refuse them too)
            reason = "shard member with an absolute or '..' name: refused (it would name a file outside the shard)"
            skipped.append({"path": f"{shard}:{name}", "reason": reason})
            log.warning("Skipping %s:%s: %s", shard, name, reason)
            continue
        key, ext = _split_key(name)
        groups.setdefault(key, {})[ext] = name
    for key, members in groups.items():
        # the plain image first: KEY.jpg before KEY.seg.png (a mask stored beside it)
        images = [name for ext, name in sorted(members.items(), key=lambda e: ("." in e[0], e[0]))
                  if has_image_extension("x." + ext)]
        if not images:
            continue  # metadata-only keys (e.g. __index__) carry no sample
        where = shard / images[0]
        try:
            label = _label(shard, members)
        except ValueError as exc:
            skipped.append({"path": str(where), "reason": str(exc)})
            log.warning("Skipping %s: %s", where, exc)
            continue
        yield where, label


def _escapes(name: str) -> bool:
    """Whether a member name is absolute (POSIX or Windows) or climbs out with '..'."""
    path = PurePosixPath(name.replace("\\", "/"))
    return path.is_absolute() or ".." in path.parts or PureWindowsPath(name).drive != ""


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is everything up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _label(shard: Path, members: dict[str, str]) -> str:
    if "json" in members:
        try:
            meta = json.loads(member_bytes(shard / members["json"]))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"unreadable .json label ({exc})") from exc
        for field_name in ("label", "class", "cls"):
            if isinstance(meta, dict) and isinstance(meta.get(field_name), (str, int)) and str(meta[field_name]).strip():
                return str(meta[field_name]).strip()
        if "cls" not in members:
            raise ValueError('the .json has no "label" (or "class") field')
    if "cls" in members:
        text = member_bytes(shard / members["cls"]).decode("utf-8", "replace").strip()
        if not text:
            raise ValueError("empty .cls label")
        return text
    raise ValueError("no .cls or .json label")
