"""The JSON file written beside every exported model: everything needed to use it without transferlab's
training code (classes, input shape and dtype, preprocessing, output meaning) and how it was checked.

``model.onnx`` → ``model.onnx.json``: appending keeps it from ever overwriting a run's own
``model.json``. Read with the standard library only, so ONNX deployments need neither torch nor us.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transferlab.errors import RunDirError

__all__ = ["SIDECAR_FORMAT", "read_sidecar", "sidecar_path"]

SIDECAR_FORMAT = "transferlab.export/1"
_REQUIRED = ("format", "runtime", "classes", "preprocessing", "input", "output")


def sidecar_path(model_path: str | Path) -> Path:
    """Where the metadata of an exported model lives."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".json")


def read_sidecar(model_path: str | Path) -> dict[str, Any]:
    """The sidecar of `model_path`, checked for the fields inference needs."""
    path = sidecar_path(model_path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunDirError(
            f"{model_path} has no metadata file {path.name} beside it (classes, preprocessing); "
            "re-export it with `transferlab export RUN`, which writes both."
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunDirError(f"{path} is unreadable or corrupt ({exc}); re-export the model.") from exc
    missing = [k for k in _REQUIRED if k not in data] if isinstance(data, dict) else list(_REQUIRED)
    if missing or data.get("format") != SIDECAR_FORMAT:
        raise RunDirError(f"{path} is not a transferlab export sidecar ({SIDECAR_FORMAT}; missing: "
                          f"{', '.join(missing) or 'none'}); re-export the model.")
    return data
