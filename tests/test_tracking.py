"""--logger: Lightning's loggers get the config, every metrics.csv row (head and fine-tuning) and the results."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from conftest import TINY
from guarantees import TINY_FLAGS, cli, read_metrics

import transferlab
from transferlab.config import LOGGERS, TrainConfig

NUMERIC = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


def test_loggers_are_taken_repeated_or_comma_separated():
    assert TrainConfig(loggers=["csv", "tensorboard, csv", ""]).loggers == ["csv", "tensorboard"]
    assert TrainConfig(loggers="mlflow,csv").loggers == ["mlflow", "csv"]


def test_loggers_get_the_config_every_epoch_row_and_the_results(tiny_data, tmp_path):
    """One run (head, then boundary fine-tuning) into csv, and tensorboard when installed."""
    loggers = ["csv", *(["tensorboard"] if HAS_TENSORBOARD else [])]
    options = {**TINY, "finetune": "boundary", "finetune_when": "always"}
    result = transferlab.train(tiny_data, out=str(tmp_path / "run"), loggers=loggers, **options)
    rows = read_metrics(result.run_dir)
    assert {r["phase"] for r in rows} == {"frozen", "finetune"}

    logged = result.run_dir / "logs" / "csv" / "version_0"
    hparams = yaml.safe_load((logged / "hparams.yaml").read_text())
    assert hparams["backbone"] == "test_efficientnet" and hparams["loggers"] == loggers
    assert hparams["finetune"] == "boundary" and hparams["epochs_frozen"] == TINY["epochs_frozen"]
    by_step: dict[int, dict[str, float]] = {}
    with open(logged / "metrics.csv") as f:
        for line in csv.DictReader(f):
            by_step.setdefault(int(line["step"]), {}).update({k: float(v) for k, v in line.items() if v})
    for step, row in enumerate(rows):
        for column in NUMERIC:
            assert by_step[step][f"{row['phase']}/{column}"] == pytest.approx(float(row[column]), rel=1e-5), (step, column)
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert by_step[len(rows) - 1]["final/val_accuracy_best"] == pytest.approx(summary["val_accuracy_best"])
    assert "final/seed" not in by_step[len(rows) - 1]  # settings are hyperparameters, not results
    if HAS_TENSORBOARD:
        _check_tensorboard(result.run_dir / "logs" / "tensorboard" / "version_0", rows)


def _check_tensorboard(folder, rows) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    for phase in ("frozen", "finetune"):
        steps = [i for i, row in enumerate(rows) if row["phase"] == phase]
        scalars = events.Scalars(f"{phase}/val_loss")
        assert [s.step for s in scalars] == steps
        assert [s.value for s in scalars] == pytest.approx([float(rows[i]["val_loss"]) for i in steps], rel=1e-5)


def test_an_unknown_or_uninstalled_logger_is_refused_before_any_work(tiny_data, tmp_path, monkeypatch):
    r = cli("train", tiny_data, *TINY_FLAGS, "--logger", "wandb", "-o", tmp_path / "a")
    assert r.code == 2 and "logger 'wandb' is not one of csv, tensorboard, mlflow" in r.text
    monkeypatch.setitem(LOGGERS, "mlflow", (("no_such_tracking_module",), "mlflow"))
    r = cli("train", tiny_data, *TINY_FLAGS, "--logger", "csv,mlflow", "-o", tmp_path / "b")
    assert r.code == 2 and "pip install 'transferlab[mlflow]'" in r.text
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


class _FakeMLflow:
    """What Tracker uses of Lightning's MLFlowLogger (mlflow itself is an optional extra)."""

    run_id = "run-1"

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.metrics, self.artefacts, self.params, self.status = fail, [], [], None, None
        self.experiment = self

    def log_hyperparams(self, params):
        self.params = params

    def log_metrics(self, metrics, step):
        if self.fail:
            raise OSError("tracking server unreachable")
        self.metrics.append((step, metrics))

    def save(self):
        pass

    def log_artifact(self, run_id, path):
        self.artefacts.append(path)

    def finalize(self, status):
        self.status = status


def test_mlflow_gets_the_run_files_and_a_failing_logger_never_stops_the_run(tmp_path, monkeypatch, caplog):
    from transferlab.training import tracking

    fakes = {"mlflow": _FakeMLflow(), "csv": _FakeMLflow(fail=True)}
    monkeypatch.setattr(tracking, "_build", lambda name, run_dir: fakes[name])
    for name in ("model.safetensors", "model.json", "report.html"):
        (tmp_path / name).write_text("x")
    rows = [{"phase": "frozen", "epoch": 1, "val_loss": 0.5}, {"phase": "finetune", "epoch": 1, "val_loss": 0.4}]
    with tracking.Tracker(["mlflow", "csv"], tmp_path, TrainConfig(backbone="resnet18")) as tracker:
        tracker.log_rows(rows[:1])
        tracker.log_rows(rows)
        tracker.finish(rows, {"val_accuracy_best": 0.75, "seed": 0})
    mlflow = fakes["mlflow"]
    assert mlflow.params["backbone"] == "resnet18" and mlflow.status == "success"
    assert mlflow.metrics == [(0, {"frozen/epoch": 1.0, "frozen/val_loss": 0.5}),
                              (1, {"finetune/epoch": 1.0, "finetune/val_loss": 0.4}),
                              (1, {"final/val_accuracy_best": 0.75})]
    assert sorted(Path(p).name for p in mlflow.artefacts) == ["model.json", "model.safetensors", "report.html"]
    assert fakes["csv"].status is None and "--logger csv failed" in caplog.text  # dropped, not fatal
