"""RunDir owns the run directory: its files' names, its status and its readers; RunState is state.json,
typed, and reads the state.json files earlier versions wrote."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest

import transferlab
from transferlab import run_dir as run_dir_module
from transferlab.errors import RunDirError
from transferlab.run_dir import RunDir, RunState, best_val_accuracy, model_files

SRC = Path(__file__).resolve().parents[1] / "src" / "transferlab"
FILE_NAMES = {run_dir_module.CONFIG, run_dir_module.DATA, run_dir_module.STATE, run_dir_module.METRICS,
              run_dir_module.MODEL_WEIGHTS, run_dir_module.MODEL_META, run_dir_module.SUMMARY,
              run_dir_module.CURVES, run_dir_module.REPORT, run_dir_module.LOG}
# the same name with another meaning: a Hugging Face Hub repository's weights file
ELSEWHERE = {("models/registry.py", "model.safetensors")}

# state.json as the version before RunState was typed wrote it (a run killed after its last epoch)
OLD_STATE_KEYS = {"frozen_done", "finetune_epochs_done", "rows", "best", "phase_seconds", "status",
                  "elapsed_seconds", "forward_images_per_second", "frozen_val_loss", "finetune_epochs_planned"}


def test_no_module_but_run_dir_spells_the_run_directorys_file_names():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel == "run_dir.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Constant) and node.value in FILE_NAMES
                    and (rel, node.value) not in ELSEWHERE):
                found.append(f"{rel}:{node.lineno} {node.value!r}")
    assert not found, "paths in a run directory come from RunDir: " + ", ".join(found)


def test_status_is_new_interrupted_or_finished(tiny_run, tmp_path):
    assert RunDir(tmp_path / "nothing").status == "new"
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    rd = RunDir(run)
    assert rd.status == "finished" and rd.is_run and rd.model_meta_path.is_file() and rd.weights_path.is_file()
    state = json.loads(rd.state_path.read_text())
    rd.state_path.write_text(json.dumps({**state, "status": "running"}))  # e.g. an extension under way
    assert rd.status == "interrupted"
    rd.summary_path.unlink()
    rd.state_path.write_text(json.dumps(state))
    assert rd.status == "interrupted"


def test_readers_give_numbers_as_numbers(tiny_run):
    rd = RunDir(tiny_run)
    rows = rd.metrics()
    assert [r["phase"] for r in rows] == ["frozen"] * 3 + ["finetune"] * 2
    assert all(isinstance(r["epoch"], int) and isinstance(r["val_loss"], float) for r in rows)
    assert best_val_accuracy(rows, "frozen") == max(r["val_accuracy"] for r in rows if r["phase"] == "frozen")
    assert best_val_accuracy(rows, "none") is None
    assert best_val_accuracy([*rows, {"phase": "frozen", "val_accuracy": float("nan")}], "frozen") == \
        best_val_accuracy(rows, "frozen")  # a diverged epoch's NaN is not a best
    assert rd.summary()["val_accuracy_best"] == rd.state().best["val_accuracy"]
    assert rd.config().epochs_finetune == 2 and rd.model_meta()["classes"] == ["blue", "red"]
    assert model_files(tiny_run) == (rd.model_meta_path, rd.weights_path)
    assert model_files(rd.weights_path) == (rd.model_meta_path, rd.weights_path)
    assert transferlab.load(rd).classes == ["blue", "red"]  # a RunDir is a path


def test_default_run_dir_is_named_by_time_and_backbone():
    path = RunDir.default("hf-hub:timm/resnet18.a1_in1k").path
    assert path.parent == Path("runs") and path.name.endswith("-hf-hub-timm-resnet18.a1_in1k")


def test_run_state_reads_the_earlier_format_and_keeps_unknown_keys(tmp_path):
    old = {"frozen_done": True, "finetune_epochs_done": 1, "rows": [{"phase": "frozen", "epoch": 1}],
           "best": {"phase": "frozen", "epoch": 1, "val_accuracy": 0.5, "val_loss": 0.7},
           "phase_seconds": {"data": 0.1}, "status": "running", "elapsed_seconds": 2.0,
           "finetune_epochs_planned": 3, "a_later_key": [1]}
    (tmp_path / "state.json").write_text(json.dumps(old))
    state = RunState.load(tmp_path)
    assert state.frozen_done and state.finetune_epochs_done == 1 and state.finetune_epochs_planned == 3
    assert state.finetune is None and state.thresholds is None and state.extensions == []
    state.finetune_epochs_done = 2
    state.save()
    again = json.loads((tmp_path / "state.json").read_text())
    assert again["a_later_key"] == [1] and again["finetune_epochs_done"] == 2
    assert {k: v for k, v in again.items() if k in old and k != "finetune_epochs_done"} == {
        k: v for k, v in old.items() if k != "finetune_epochs_done"}


def test_a_state_that_is_not_an_object_is_a_clear_error(tmp_path):
    (tmp_path / "state.json").write_text("[1, 2]")
    with pytest.raises(RunDirError, match="not a run state"):
        RunState.load(tmp_path)


def test_a_run_interrupted_under_the_earlier_state_format_resumes(tiny_run, tmp_path):
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    rd = RunDir(run)
    state = json.loads(rd.state_path.read_text())
    rows = state["rows"]
    old = {k: v for k, v in state.items() if k in OLD_STATE_KEYS}
    rd.state_path.write_text(json.dumps({**old, "status": "running"}))  # killed after its last epoch
    rd.summary_path.unlink()
    assert rd.status == "interrupted"
    result = transferlab.train(resume=run)
    assert result.rows == rows and rd.status == "finished"
    assert result.summary["val_accuracy_best"] == state["best"]["val_accuracy"]
