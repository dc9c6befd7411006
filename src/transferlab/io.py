"""Atomic, pickle-free persistence: safetensors for tensors, JSON/YAML for everything else.

Every file is written to a temporary name in the same directory, fsynced, then renamed over the
target, so a run killed mid-write never leaves a half-written file that would later be read as valid.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as serialize_tensors

from transferlab.errors import RunDirError


class WriteFailed(RunDirError, OSError):
    """A file could not be written (disk full, permissions...). The target was not touched: its
    previous version, if any, is intact. Still an OSError, so callers that can do without the file
    (the feature cache) keep catching it as one."""


_WRITE_HINTS = {
    errno.ENOSPC: "the disk is full: free some space",
    errno.EDQUOT: "the disk quota is exhausted: free some space",
    errno.EACCES: "permission denied: fix the permissions or choose another --out",
    errno.EROFS: "the file system is read-only: choose another --out",
}


def _write_failed(path: Path, exc: OSError) -> WriteFailed:
    hint = _WRITE_HINTS.get(exc.errno, exc.strerror or str(exc))
    error = WriteFailed(
        f"Could not write {path}: {hint}. Nothing was overwritten: the previous {path.name}, if any, "
        "is intact. Then retry; an interrupted training run continues from its last finished epoch "
        "with `transferlab train --resume RUN_DIR`."
    )
    error.errno = exc.errno
    return error


def _atomic_replace(path: Path, write) -> None:
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if isinstance(exc, OSError) and not isinstance(exc, WriteFailed):
            raise _write_failed(path, exc) from exc
        raise


def _write_bytes(tmp: str, data: bytes) -> None:
    with open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    data = text.encode("utf-8")
    _atomic_replace(path, lambda tmp: _write_bytes(tmp, data))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, json.JSONDecodeError) as exc:
        raise RunDirError(f"{path} is unreadable or corrupt ({exc}); re-run training to recreate it") from exc


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors needs contiguous, non-shared tensors: clone views so tied weights save too."""
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    # Serialised here and written by Python, so a full disk is an OSError with its errno (safetensors'
    # own file writer reports it as an opaque SafetensorError).
    data = serialize_tensors(clean, metadata=metadata)
    _atomic_replace(path, lambda tmp: _write_bytes(tmp, data))


class UnsafeFile(RunDirError):
    """A pickle-based file offered as weights: refused, never unpickled."""


# How pickle-based checkpoints begin: a pickle stream (protocol 2+, or the legacy torch.save tar/magic
# number also starts with one), or the zip archive torch.save writes since torch 1.6.
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")


def refuse_pickle(path: Path) -> None:
    """Raise UnsafeFile if `path` is a pickle-based checkpoint (.pt/.pth/.ckpt/.bin): unpickling one
    can run any code its author wanted, so such files are refused before anything reads them."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return  # the caller's own read reports it
    if head.startswith(_PICKLE_MAGIC):
        raise UnsafeFile(
            f"Refusing to load {path}: it is a pickle-based PyTorch checkpoint (torch.save, .pt/.pth/.ckpt). "
            "Unpickling a file can run arbitrary code, so transferlab reads weights only from safetensors "
            "files. If you trust its source, convert it once: `python -c \"import torch, safetensors.torch as s; "
            "s.save_file(torch.load('IN.pt', weights_only=True), 'OUT.safetensors')\"`."
        )


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Inside, every torch.load — including third-party ones that pass weights_only=False, such as
    torchvision's weight download — loads tensors only and refuses code-carrying pickles (torch's
    own TORCH_FORCE_WEIGHTS_ONLY_LOAD switch, read at each call)."""
    previous = os.environ.get(_FORCE_WEIGHTS_ONLY)
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(_FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[_FORCE_WEIGHTS_ONLY] = previous


_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file (never unpickled); a corrupt or pickle file is a RunDirError."""
    if Path(path).exists():
        refuse_pickle(path)
    try:
        return load_file(str(path), device="cpu")
    except FileNotFoundError:
        raise
    except (SafetensorError, OSError, ValueError) as exc:
        raise RunDirError(f"{path} is not a valid safetensors file ({exc})") from exc


def tensor_metadata(path: Path) -> dict[str, str]:
    """The string metadata stored in a safetensors header (read without loading the tensors)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise RunDirError(f"{path} is not a valid safetensors file ({exc})") from exc


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape from a safetensors header, read without loading (or allocating) any tensor."""
    from safetensors import safe_open

    refuse_pickle(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise RunDirError(f"{path} is not a valid safetensors file ({exc})") from exc


def is_writable_dir(path: Path) -> bool:
    """Whether a file can be created in the existing directory `path`, by trying (a permission check
    alone is wrong for root, for read-only mounts and for network file systems)."""
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test."):
            return True
    except OSError:
        return False


def ensure_writable_dir(path: Path) -> Path:
    """Create the output directory and prove it is writable before hours of work go into it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise RunDirError(
            f"Cannot write to output directory '{path}': {exc.strerror or exc}. "
            "Choose another location with --out."
        ) from exc
    return path
