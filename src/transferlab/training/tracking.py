"""Experiment tracking (``--logger csv|tensorboard|mlflow``) through Lightning's loggers.

Each logger gets the run's configuration (``log_hyperparams``), every epoch row that goes into
metrics.csv (as ``<phase>/<column>`` at step = the row's index, so the head and fine-tuning stages share
one axis) and, at the end, the summary's figures as ``final/<name>``; MLflow also gets the run's files
as artefacts. transferlab's own metrics.csv is written either way.

Where they write: csv and tensorboard under ``RUN/logs/<logger>/version_N`` (one version per
invocation, so ``tensorboard --logdir runs`` finds every run); mlflow to ``$MLFLOW_TRACKING_URI``, else
``./mlruns`` (Lightning's default), experiment "transferlab", run name = the run directory's name.
Which names exist and which packages they need is :data:`transferlab.config.LOGGERS`, checked with the
other options before any work.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from lightning.pytorch.loggers import Logger

from transferlab.config import TrainConfig
from transferlab.run_dir import CONFIG, CURVES, METRICS, MODEL_META, MODEL_WEIGHTS, REPORT, SUMMARY

log = logging.getLogger("transferlab")

# What MLflow receives as artefacts, those that exist (the report only when one was written).
ARTEFACTS = (MODEL_WEIGHTS, MODEL_META, REPORT, METRICS, CONFIG, SUMMARY, CURVES)
MLFLOW_EXPERIMENT = "transferlab"


def _build(name: str, run_dir: Path) -> Logger:
    if name == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(run_dir / "logs"), name="csv")
    if name == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        # no hp_metric placeholder of -1: the real figures come as final/* at the end
        return TensorBoardLogger(save_dir=str(run_dir / "logs"), name="tensorboard", default_hp_metric=False)
    if name == "mlflow":
        from lightning.pytorch.loggers import MLFlowLogger

        return MLFlowLogger(experiment_name=MLFLOW_EXPERIMENT, run_name=run_dir.name)
    raise ValueError(f"unknown logger {name!r}")  # TrainConfig.validate rejects it before a run starts


def _numbers(values: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """The finite numbers of ``values`` as ``prefix/key`` (loggers take floats only; NaN is no value)."""
    return {f"{prefix}/{k}": float(v) for k, v in values.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


class Tracker:
    """The loggers of one invocation of a run; a no-op without names (so on every rank but zero).

    They are opened at the first epoch row, not before: a run that fails earlier leaves no logger files.
    A logger that fails is dropped with a warning: tracking never costs the training run. As a context
    manager, the loggers are closed as "success" or "failed".
    """

    def __init__(self, names: Sequence[str], run_dir: Path, config: TrainConfig) -> None:
        self.names, self.run_dir, self.config = list(names), Path(run_dir), config
        self.loggers: dict[str, Logger] | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._each(lambda logger: logger.finalize("success" if kind is None else "failed"))

    def log_rows(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """After each epoch, with every row so far (the last one is new)."""
        if self.loggers is None:
            self._open(rows)
        else:
            self._log(rows[-1], len(rows) - 1)

    def finish(self, rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]) -> None:
        """The summary's figures (and, to MLflow, the run's files) once the run is complete."""
        if self.loggers is None:  # no epoch in this invocation (a finished run resumed): every row now
            self._open(rows)
        # the summary's figures that are not settings (those went in as hyperparameters)
        settings = self.config.to_dict()
        final = _numbers({k: v for k, v in summary.items() if k not in settings}, "final")

        def send(logger: Logger) -> None:
            logger.log_metrics(final, step=max(len(rows) - 1, 0))
            logger.save()
            if hasattr(logger, "run_id"):  # MLflow keeps files too
                for name in ARTEFACTS:
                    if (self.run_dir / name).is_file():
                        logger.experiment.log_artifact(logger.run_id, str(self.run_dir / name))

        self._each(send)
        for name, logger in (self.loggers or {}).items():
            where = f"run {logger.run_id}" if hasattr(logger, "run_id") else logger.log_dir
            log.info("logged to %s: %s", name, where)

    def _open(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Open the loggers, then log the configuration (as resolved by now) and the rows so far: on a
        resumed run, those an earlier invocation recorded."""
        self.loggers = {}
        for name in self.names:
            try:
                self.loggers[name] = _build(name, self.run_dir)
            except Exception as exc:  # noqa: BLE001 - e.g. an unreachable MLflow server
                log.warning("--logger %s is off for this run: %s", name, exc)
        config = self.config.to_dict()
        self._each(lambda logger: logger.log_hyperparams(config))
        for step, row in enumerate(rows):
            self._log(row, step)

    def _log(self, row: Mapping[str, Any], step: int) -> None:
        metrics = _numbers({k: v for k, v in row.items() if k != "phase"}, str(row["phase"]))

        def send(logger: Logger) -> None:
            logger.log_metrics(metrics, step=step)
            logger.save()  # on disk after every epoch: an interrupted run keeps what it logged

        self._each(send)

    def _each(self, call: Callable[[Logger], None]) -> None:
        for name, logger in list((self.loggers or {}).items()):
            try:
                call(logger)
            except Exception as exc:  # noqa: BLE001 - a tracking failure must not cost the training run
                log.warning("--logger %s failed and is off for the rest of this run: %s", name, exc)
                del self.loggers[name]
