"""Where sample bytes live: a file on disk, or a member of an uncompressed tar shard read in place.

The lowest data layer: decoding (images.py), shard reading (shards.py) and shard writing
(shard_writer.py) all fetch bytes through it, and it imports none of them.
"""

from __future__ import annotations

import functools
import tarfile
from pathlib import Path

from transferlab.errors import DataError

__all__ = ["SHARD_SUFFIX", "member_bytes", "shard_index"]

SHARD_SUFFIX = ".tar"


@functools.lru_cache(maxsize=4096)
def _index(shard: str, mtime_ns: int, size: int) -> dict[str, tuple[int, int]]:
    try:
        with tarfile.open(shard, mode="r:") as tar:  # "r:": uncompressed, so members can be seeked
            return {m.name: (m.offset_data, m.size) for m in tar if m.isfile()}
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"Cannot read shard {shard}: {exc}. Shards must be uncompressed .tar files.") from exc


def shard_index(shard: Path) -> dict[str, tuple[int, int]]:
    """Member name → (data offset, size), built once per process and shard version."""
    stat = Path(shard).stat()
    return _index(str(shard), stat.st_mtime_ns, stat.st_size)


def member_bytes(path: Path) -> bytes:
    """The bytes of `shard.tar/member`; FileNotFoundError when `path` names no shard member."""
    path = Path(path)
    for shard in path.parents:
        if shard.suffix.lower() == SHARD_SUFFIX and shard.is_file():
            member = path.relative_to(shard).as_posix()
            entry = shard_index(shard).get(member)
            if entry is None:
                break
            offset, size = entry
            with open(shard, "rb") as f:
                f.seek(offset)
                return f.read(size)
    raise FileNotFoundError(f"no such file or shard member: {path}")
