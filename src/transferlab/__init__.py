"""transferlab: folder of labelled images → strong classifier, by transfer learning, offline-first."""

__version__ = "0.1.0"

from transferlab.api import compare, demo, evaluate, list_models, predict, report, select, train
from transferlab.api import bench_infer, export_model, predict_to_file, serve  # shipping a model (export/)
from transferlab.config import TrainConfig
from transferlab.errors import TransferlabError

__all__ = [
    "TrainConfig", "TransferlabError", "__version__", "compare", "demo", "evaluate", "list_models", "predict", "report",
    "select", "train",
    "bench_infer", "export_model", "predict_to_file", "serve",
]
