"""A training run's directory: the one owner of its layout, its status and the readers of its files.

    config.yaml        the run's TrainConfig (written when the run starts; an extension updates it)
    data.json          the data's fingerprint and split summary (a resumed run checks it)
    state.json         RunState: which stages are done, the metrics rows, the best epoch
    metrics.csv        one row per epoch (rewritten after each)
    model.safetensors  the best model's weights; model.json its metadata (the commit point, written last)
    summary.json       the headline figures, written when the run finishes
    curves.png, report.html, train.log, eval-*.json, checkpoints/   the rest

Status, one rule: "finished" once summary.json is written and state.json says so (an extension sets
state.json back to running before its first epoch, so a killed one reads as interrupted), "interrupted"
when config.yaml exists without that, "new" otherwise.

Nothing heavy is imported here (training, evaluation, reporting and the CLI's fast paths all read it):
torch comes only with the atomic writes. The classifier is `transferlab.load(run_dir)` (a RunDir is a
path-like): the model layer reads the run directory, not the other way round, so no import circle.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transferlab.errors import RunDirError

if TYPE_CHECKING:
    from transferlab.config import TrainConfig

CONFIG = "config.yaml"
DATA = "data.json"
STATE = "state.json"
METRICS = "metrics.csv"
MODEL_WEIGHTS = "model.safetensors"
MODEL_META = "model.json"
SUMMARY = "summary.json"
CURVES = "curves.png"
REPORT = "report.html"
LOG = "train.log"
CHECKPOINTS = "checkpoints"

METRIC_COLUMNS = [
    "phase", "epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
    "lr", "epoch_seconds", "elapsed_seconds",
]


def _read_json(path: Path) -> Any:
    from transferlab.io import read_json

    return read_json(path)


def model_files(path: str | Path) -> tuple[Path, Path]:
    """(model.json, model.safetensors) of a run directory, or of a weights file and its .json beside it."""
    path = Path(path)
    if path.is_dir():
        return path / MODEL_META, path / MODEL_WEIGHTS
    return path.with_suffix(".json"), path


class RunDir:
    """The files of one run directory, its status, and their readers (numbers as numbers)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __fspath__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @classmethod
    def default(cls, backbone: str) -> RunDir:
        """runs/<time>-<backbone>, characters a folder name cannot hold turned into '-'."""
        from transferlab.paths import slug

        return cls(Path("runs") / f"{datetime.now():%Y%m%d-%H%M%S}-{slug(backbone)}")

    # ---- paths
    config_path = property(lambda self: self.path / CONFIG)
    data_path = property(lambda self: self.path / DATA)
    state_path = property(lambda self: self.path / STATE)
    metrics_path = property(lambda self: self.path / METRICS)
    weights_path = property(lambda self: self.path / MODEL_WEIGHTS)
    model_meta_path = property(lambda self: self.path / MODEL_META)
    summary_path = property(lambda self: self.path / SUMMARY)
    curves_path = property(lambda self: self.path / CURVES)
    report_path = property(lambda self: self.path / REPORT)
    log_path = property(lambda self: self.path / LOG)
    checkpoints = property(lambda self: self.path / CHECKPOINTS)

    # ---- what the run is
    @property
    def is_run(self) -> bool:
        """A training run's directory (its config.yaml), as opposed to any other folder."""
        return self.config_path.is_file()

    @property
    def status(self) -> str:
        """'new', 'interrupted' or 'finished' (the module's docstring gives the rule)."""
        if self.summary_path.is_file() and (not self.state_path.is_file() or self.state().status == "finished"):
            return "finished"
        return "interrupted" if self.is_run else "new"

    # ---- readers
    def state(self) -> RunState:
        return RunState.load(self)

    def config(self) -> TrainConfig:
        from transferlab.config import TrainConfig

        if not self.is_run:
            raise RunDirError(f"'{self.path}' is not a run directory (no {CONFIG}).")
        return TrainConfig.load(self.config_path)

    def summary(self) -> dict[str, Any]:
        """summary.json ({} before the run finished)."""
        return self._optional_json(self.summary_path)

    def model_meta(self) -> dict[str, Any]:
        return self._optional_json(self.model_meta_path)

    def data_summary(self) -> dict[str, Any]:
        return self._optional_json(self.data_path)

    def metrics(self) -> list[dict[str, Any]]:
        """metrics.csv's rows, numbers as numbers (epoch an int), [] before the first epoch."""
        if not self.metrics_path.is_file():
            return []
        with open(self.metrics_path, newline="", encoding="utf-8") as f:
            return [{k: _number(k, v) for k, v in row.items()} for row in csv.DictReader(f)]

    # ---- writers
    def write_metrics(self, rows: list[dict]) -> None:
        import io

        from transferlab.io import atomic_write_text

        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
        atomic_write_text(self.metrics_path, buf.getvalue())

    def write_json(self, name: str, data: Any) -> None:
        from transferlab.io import atomic_write_json

        atomic_write_json(self.path / name, data)

    @staticmethod
    def _optional_json(path: Path) -> dict[str, Any]:
        return _read_json(path) if path.is_file() else {}


def best_val_accuracy(rows: list[dict[str, Any]], phase: str) -> float | None:
    """The highest finite val accuracy of `phase`'s rows (RunDir.metrics()); None when it ran none."""
    values = [r["val_accuracy"] for r in rows if r.get("phase") == phase
              and isinstance(r.get("val_accuracy"), float) and math.isfinite(r["val_accuracy"])]
    return max(values) if values else None


def _number(key: str, value: str | None) -> Any:
    if key == "phase" or value is None:
        return value
    try:
        return int(value) if key == "epoch" else float(value)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            return value


@dataclass
class RunState:
    """state.json, typed: which stages are done, the metrics rows and the best model so far.

    Optional fields are None until their stage sets them; `extra` keeps keys this version does not know,
    so a state.json is written back with nothing lost."""

    run_dir: RunDir | None = field(default=None, repr=False, compare=False)
    status: str = "running"  # "running" | "finished"
    frozen_done: bool = False
    frozen_val_loss: float | None = None  # the frozen stage's best val loss: what the fine-tuning gate must beat
    forward_images_per_second: float | None = None  # measured in the feature pass; plans a --time-budget
    finetune_epochs_planned: int | None = None  # fine-tuning epochs this run (or its extension) runs to
    finetune_epochs_done: int = 0
    finetune_cycle_start: int = 0  # fine-tuning epochs before the current cycle (an extension's starting point)
    finetune_stopped_early: bool = False
    boundary_done: bool = False
    finetune: dict[str, Any] | None = None  # boundary fine-tuning's record for the summary
    thresholds: dict[str, Any] | None = None  # multi-label: the tuned per-label thresholds
    time_budget: dict[str, Any] | None = None
    extensions: list[dict[str, Any]] = field(default_factory=list)  # each `--resume --epochs-finetune` that trained more
    rows: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None  # {"phase", "epoch", "val_accuracy", "val_loss"}
    phase_seconds: dict[str, float] = field(default_factory=dict)
    elapsed_seconds: float = 0.0  # over every invocation of the run
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], run_dir: RunDir | None = None) -> RunState:
        known = {f.name for f in dataclasses.fields(cls)} - {"run_dir", "extra"}
        values = {k: v for k, v in data.items() if k in known}
        return cls(run_dir=run_dir, **values, extra={k: v for k, v in data.items() if k not in known})

    @classmethod
    def load(cls, run_dir: RunDir | str | Path) -> RunState:
        """The run's state.json (written by this version or an earlier one), or a new state."""
        rd = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        if not rd.state_path.exists():
            return cls(run_dir=rd)
        data = _read_json(rd.state_path)
        if not isinstance(data, dict):
            raise RunDirError(f"{rd.state_path} is not a run state (a JSON object); re-run training to recreate it")
        return cls.from_dict(data, rd)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("run_dir", "extra")}
        return {**self.extra, **data}

    def update(self, data: dict[str, Any]) -> None:
        """Take every field from `data` (a checkpoint's copy of the state, newer than state.json)."""
        newer = RunState.from_dict(data, self.run_dir)
        for f in dataclasses.fields(self):
            if f.name != "run_dir":
                setattr(self, f.name, getattr(newer, f.name))

    def save(self) -> None:
        if self.run_dir is None:
            raise RunDirError("this run state belongs to no run directory")
        self.run_dir.write_json(STATE, self.to_dict())

    def add_seconds(self, phase: str, seconds: float) -> None:
        self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + seconds


__all__ = ["METRIC_COLUMNS", "RunDir", "RunState", "best_val_accuracy", "model_files"]
