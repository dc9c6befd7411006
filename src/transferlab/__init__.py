"""transferlab: folder of labelled images → strong classifier, by transfer learning, offline-first.

The public names are imported on first use (PEP 562): ``import transferlab`` and the CLI's ``--help`` then
load neither numpy, PIL nor the modules behind them until a name such as ``transferlab.load`` is asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from transferlab._version import __version__

if TYPE_CHECKING:
    from transferlab.api import (
        bench_infer,
        compare,
        demo,
        doctor,
        evaluate,
        export_model,
        list_models,
        lr_find,
        predict,
        predict_to_file,
        report,
        select,
        serve,
        train,
    )
    from transferlab.classifier import Classifier, Prediction, load
    from transferlab.config import TrainConfig
    from transferlab.errors import TransferlabError

__all__ = [
    "Classifier",
    "Prediction",
    "TrainConfig",
    "TransferlabError",
    "__version__",
    "bench_infer",
    "compare",
    "demo",
    "doctor",
    "evaluate",
    "export_model",
    "list_models",
    "load",
    "lr_find",
    "predict",
    "predict_to_file",
    "report",
    "select",
    "serve",
    "train",
]

# Each public name → the module that defines it (the functions not listed here are transferlab.api's); "api"
# is that module itself, for callers that reach it as an attribute.
_HOMES: dict[str, str] = {
    **dict.fromkeys(__all__, "transferlab.api"),
    **dict.fromkeys(("Classifier", "Prediction", "load"), "transferlab.classifier"),
    "TrainConfig": "transferlab.config",
    "TransferlabError": "transferlab.errors",
    "api": "transferlab.api",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'transferlab' has no attribute {name!r}")
    module = importlib.import_module(home)
    value = module if home == f"{__name__}.{name}" else getattr(module, name)
    globals()[name] = value  # later look-ups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})
