"""transferlab: folder of labelled images → strong classifier, by transfer learning, offline-first."""

from transferlab._version import __version__
from transferlab.api import (  # shipping a model (export/)
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
