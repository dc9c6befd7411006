"""Extending a finished run (`train --resume RUN --epochs-finetune N`): a new fine-tuning cycle from the
best model, rows appended, the best replaced only by a better epoch; options a resumed run cannot honour
are refused before any work."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from conftest import TINY
from guarantees import cli

import transferlab
from transferlab.config import TrainConfig
from transferlab.errors import TransferlabError
from transferlab.run_dir import RunDir
from transferlab.training import run as run_module

BOUNDARY = {**TINY, "finetune": "boundary", "epochs_finetune": 2, "boundary_views": 1, "finetune_when": "always"}


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _finetune_epochs(rows) -> list[int]:
    return [int(r["epoch"]) for r in rows if r["phase"] == "finetune"]


def _copy(run, tmp_path):
    return shutil.copytree(run, tmp_path / "run")


def _check_extended(first_rows, result, old_model: str, to: int) -> None:
    rd = RunDir(result.run_dir)
    assert _finetune_epochs(result.rows) == list(range(1, to + 1))
    assert result.rows[: len(first_rows)] == first_rows  # the first cycle's rows are kept as they were
    assert _finetune_epochs(rd.metrics()) == list(range(1, to + 1))
    assert rd.status == "finished" and rd.config().epochs_finetune == to
    summary = rd.summary()
    assert summary["extensions"][-1]["from_epochs"] == 2 and summary["extensions"][-1]["to_epochs"] == to
    assert rd.state().finetune_epochs_done == to
    # the best model changes only when a new epoch beat the old best on val
    best_before = max(first_rows, key=lambda r: (r["val_accuracy"], -r["val_loss"]))
    if summary["best"]["phase"] == "finetune" and summary["best"]["epoch"] > 2:
        assert _digest(rd.weights_path) != old_model
        assert (summary["val_accuracy_best"], -summary["best"]["val_loss"]) > (
            best_before["val_accuracy"], -best_before["val_loss"])
    else:
        assert _digest(rd.weights_path) == old_model
    assert json.loads(rd.model_meta_path.read_text())["best"] == summary["best"]


def test_a_finished_run_trains_longer_with_a_new_cycle_from_its_best_model(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path)
    first = RunDir(run).state().rows
    old_model = _digest(run / "model.safetensors")
    result = transferlab.train(resume=run, epochs_finetune=4)
    _check_extended(first, result, old_model, 4)
    # resuming the extended run without more epochs: finished, nothing to do
    again = transferlab.train(resume=run)
    assert again.rows == result.rows


def test_the_cli_extends_a_boundary_run_on_its_own_boundary_cache(tiny_data, tmp_path):
    first = transferlab.train(tiny_data, out=str(tmp_path / "run"), **BOUNDARY)
    assert first.summary["finetune"]["mode"] == "boundary"
    old_model = _digest(first.run_dir / "model.safetensors")
    # 4 is also the option's default: given on the command line, it still counts
    r = cli("train", "--resume", first.run_dir, "--epochs-finetune", "4", "--no-progress")
    assert r.code == 0, r.text
    assert "extending" in r.text
    rd = RunDir(first.run_dir)
    result = run_module.TrainResult(run_dir=rd.path, summary=rd.summary(), rows=rd.state().rows)
    _check_extended(first.rows, result, old_model, 4)
    ft = rd.summary()["finetune"]
    assert ft["mode"] == "boundary" and ft["epochs_run"] == 4


def test_an_interrupted_extension_is_resumed(tiny_run, tmp_path, monkeypatch):
    run = _copy(tiny_run, tmp_path)
    first = RunDir(run).state().rows
    real_save = run_module.RunState.save

    def die_after_epoch_3(self):
        real_save(self)
        if self.finetune_epochs_done == 3:
            raise RuntimeError("killed")

    monkeypatch.setattr(run_module.RunState, "save", die_after_epoch_3)
    with pytest.raises(RuntimeError, match="killed"):
        transferlab.train(resume=run, epochs_finetune=4)
    monkeypatch.setattr(run_module.RunState, "save", real_save)
    assert RunDir(run).status == "interrupted" and RunDir(run).config().epochs_finetune == 4
    result = transferlab.train(resume=run)  # no --epochs-finetune needed: config.yaml says 4
    assert _finetune_epochs(result.rows) == [1, 2, 3, 4] and result.rows[: len(first)] == first
    assert RunDir(run).status == "finished" and len(RunDir(run).state().extensions) == 1


def test_other_options_with_resume_are_refused_before_any_work(tiny_run, tmp_path, monkeypatch):
    run = _copy(tiny_run, tmp_path)
    before = {p.name: _digest(p) for p in run.iterdir() if p.is_file()}
    monkeypatch.setattr(run_module.TrainingFlow, "run", lambda self: pytest.fail("no work should start"))
    r = cli("train", "--resume", run, "--lr-head", "0.1", "--epochs-finetune", "5")
    assert r.code == 2 and "Traceback" not in r.text
    assert "--lr-head" in r.text and "--epochs-finetune" not in r.text.split("cannot be changed")[0]
    with pytest.raises(TransferlabError, match="--seed"):
        transferlab.train(resume=run, seed=3)
    with pytest.raises(TransferlabError, match="DATA"):
        transferlab.train(tmp_path, resume=run)
    assert {p.name: _digest(p) for p in run.iterdir() if p.is_file()} == before


def test_an_interrupted_run_is_not_extended_before_it_finishes(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path)
    state = json.loads((run / "state.json").read_text())
    (run / "state.json").write_text(json.dumps({**state, "status": "running"}))
    with pytest.raises(TransferlabError, match="interrupted run of 2 fine-tuning epoch"):
        transferlab.train(resume=run, epochs_finetune=5)


def test_a_head_only_run_is_not_extended(tiny_data, tmp_path):
    run = transferlab.train(tiny_data, out=str(tmp_path / "run"), **{**TINY, "strategy": "head-only"}).run_dir
    r = cli("train", "--resume", run, "--epochs-finetune", "3")
    assert r.code == 2 and "head-only run" in r.text and "Traceback" not in r.text


def test_a_run_whose_fine_tuning_was_skipped_is_not_extended(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path)
    state = json.loads((run / "state.json").read_text())
    state["finetune"] = {"mode": "boundary", "skipped": "head not underfitting", "epochs_run": 0}
    (run / "state.json").write_text(json.dumps(state))
    with pytest.raises(TransferlabError, match="skipped fine-tuning .head not underfitting.*--finetune-when always"):
        transferlab.train(resume=run, epochs_finetune=4)


def test_the_extension_keeps_the_runs_settings(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path)
    saved = TrainConfig.load(run / "config.yaml").to_dict()
    transferlab.train(resume=run, epochs_finetune=3, report=False)
    assert TrainConfig.load(run / "config.yaml").to_dict() == {**saved, "epochs_finetune": 3}


def test_an_interrupted_boundary_extension_is_redone_from_where_its_cycle_started(tiny_data, tmp_path, monkeypatch):
    first = transferlab.train(tiny_data, out=str(tmp_path / "run"), **{**BOUNDARY, "lr_finetune": 3e-2})
    real_top = run_module.boundary.train_top

    def killed_after_one_epoch(*args, on_epoch, **kwargs):
        def then_die(rec, improved):
            on_epoch({**rec, "val_accuracy": 1.0, "val_loss": -1.0}, True)  # an epoch no real one can beat
            raise RuntimeError("killed")
        return real_top(*args, on_epoch=then_die, **kwargs)

    monkeypatch.setattr(run_module.boundary, "train_top", killed_after_one_epoch)
    with pytest.raises(RuntimeError, match="killed"):
        transferlab.train(resume=first.run_dir, epochs_finetune=4)
    assert RunDir(first.run_dir).model_meta()["best"]["val_loss"] == -1.0  # the killed attempt's epoch was saved
    monkeypatch.setattr(run_module.boundary, "train_top", real_top)
    result = transferlab.train(resume=first.run_dir)
    assert _finetune_epochs(result.rows) == [1, 2, 3, 4] and result.rows[: len(first.rows)] == first.rows
    best = result.summary["best"]
    assert any(r["phase"] == best["phase"] and r["epoch"] == best["epoch"]
               and r["val_loss"] == best["val_loss"] for r in result.rows)  # a real epoch, not the killed one
    assert best["val_loss"] != -1.0 and RunDir(first.run_dir).model_meta()["best"] == best


def test_an_extension_killed_before_its_summary_is_not_taken_for_finished(tiny_run, tmp_path, monkeypatch):
    run = _copy(tiny_run, tmp_path)
    real_write = run_module.atomic_write_json

    def killed_at_the_summary(path, data):
        if path == RunDir(run).summary_path:
            raise RuntimeError("killed")
        real_write(path, data)

    monkeypatch.setattr(run_module, "atomic_write_json", killed_at_the_summary)
    with pytest.raises(RuntimeError, match="killed"):
        transferlab.train(resume=run, epochs_finetune=3)
    assert RunDir(run).status == "interrupted"  # the previous summary.json is still there, but stale
    monkeypatch.setattr(run_module, "atomic_write_json", real_write)
    result = transferlab.train(resume=run)
    assert _finetune_epochs(result.rows) == [1, 2, 3] and RunDir(run).summary()["extensions"][0]["to_epochs"] == 3
