"""`transferlab compare`: a backbone × strategy grid of real runs, its outputs, and restarting it."""

from __future__ import annotations

import csv
import json
import re

import pytest
from conftest import TINY

import transferlab
from transferlab.errors import RunDirError

GRID = {**TINY, "epochs_frozen": 2, "epochs_finetune": 1}
BACKBONES, STRATEGIES = "test_efficientnet,test_resnet", "head-only,two-stage"


def _spy_train(monkeypatch):
    from transferlab.training import run

    calls = []
    real = run.train

    def spy(*args, **kwargs):
        calls.append(kwargs.get("resume"))
        return real(*args, **kwargs)

    monkeypatch.setattr(run, "train", spy)
    return calls


def test_compare_grid_writes_table_plots_and_a_self_contained_page_then_restarts(tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    result = transferlab.compare(tiny_data, BACKBONES, STRATEGIES, out=out, **GRID)

    cells = [(r["backbone"], r["strategy"]) for r in result.rows]
    assert cells == [("test_efficientnet", "head-only"), ("test_efficientnet", "two-stage"),
                     ("test_resnet", "head-only"), ("test_resnet", "two-stage")]
    for name in ("compare.csv", "compare.json", "compare.html", "compare_accuracy.png", "compare_curves.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    with open(out / "compare.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["backbone"], r["strategy"]) for r in table] == cells
    by_strategy = {r["strategy"]: r for r in result.rows if r["backbone"] == "test_resnet"}
    assert by_strategy["head-only"]["val_accuracy_finetune"] is None  # no fine-tuning stage
    assert by_strategy["head-only"]["epochs"] == 2 and by_strategy["two-stage"]["epochs"] == 3
    for r in result.rows:
        assert r["status"] == "trained" and r["latency_ms_b1"] > 0 and r["params"] > 0
        assert r["val_accuracy_best"] >= 0.9  # tinted squares: near chance means a broken cell
        assert (out / f"{r['backbone']}__{r['strategy']}" / "summary.json").is_file()
    assert by_strategy["two-stage"]["val_accuracy_feature_extraction"] is not None
    assert by_strategy["two-stage"]["val_accuracy_finetune"] is not None
    saved = json.loads((out / "compare.json").read_text())
    assert len(saved["rows"]) == 4 and len(saved["curves"]["test_resnet__two-stage"]) == 3
    page = (out / "compare.html").read_text()
    assert page.count('src="data:image/png;base64,') == 2
    assert not re.search(r'(src|href)="(https?:|file:|[^"d#])', page)  # nothing outside the file
    assert "test_resnet" in page and "two-stage" in page

    # re-running skips every finished cell
    calls = _spy_train(monkeypatch)
    again = transferlab.compare(tiny_data, BACKBONES, STRATEGIES, out=out, **GRID)
    assert calls == [] and {r["status"] for r in again.rows} == {"skipped"}

    # a cell without summary.json is resumed, the others still skipped
    cell = out / "test_efficientnet__two-stage"
    (cell / "summary.json").unlink()
    third = transferlab.compare(tiny_data, BACKBONES, STRATEGIES, out=out, **GRID)
    assert calls == [cell]
    assert (cell / "summary.json").is_file()
    assert [r["status"] for r in third.rows] == ["skipped", "resumed", "skipped", "skipped"]

    # the same folder with other settings is refused, not silently mixed
    with pytest.raises(RunDirError, match="epochs_finetune"):
        transferlab.compare(tiny_data, BACKBONES, STRATEGIES, out=out, **{**GRID, "epochs_finetune": 3})
    assert calls == [cell]


def test_invalid_grid_is_rejected_before_any_training(tiny_data, tmp_path, monkeypatch):
    calls = _spy_train(monkeypatch)
    with pytest.raises(transferlab.TransferlabError, match="strategy"):
        transferlab.compare(tiny_data, "test_resnet", "head-only,magic", out=tmp_path / "c", **GRID)
    with pytest.raises(transferlab.TransferlabError, match="epochs-frozen"):
        transferlab.compare(tiny_data, "test_resnet", "head-only", out=tmp_path / "c", **{**GRID, "epochs_frozen": 0})
    assert calls == [] and not (tmp_path / "c").exists()


def test_best_cell_breaks_accuracy_ties_by_val_loss_then_speed(tmp_path):
    from transferlab.workflows.compare import CompareResult

    rows = [
        {"backbone": "fast", "val_accuracy_best": 0.96, "val_loss_best": 0.20, "train_seconds": 10.0},
        {"backbone": "sure", "val_accuracy_best": 0.96, "val_loss_best": 0.12, "train_seconds": 90.0},
        {"backbone": "worse", "val_accuracy_best": 0.95, "val_loss_best": 0.01, "train_seconds": 1.0},
    ]
    assert CompareResult(out_dir=tmp_path, rows=rows).best["backbone"] == "sure"
    rows[1]["val_loss_best"] = 0.20
    assert CompareResult(out_dir=tmp_path, rows=rows).best["backbone"] == "fast"
