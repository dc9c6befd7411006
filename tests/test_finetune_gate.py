"""Two-stage fine-tuning stops when its first epochs do not beat the frozen stage it started from."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from conftest import TINY
from test_training import read_metrics

import transferlab
from transferlab.config import TrainConfig
from transferlab.training import gate as gate_mod
from transferlab.training import run as run_mod
from transferlab.training.gate import FrozenStageGate, beat_frozen_stage


def _epoch(gate: FrozenStageGate, current_epoch: int, val_loss: float) -> SimpleNamespace:
    trainer = SimpleNamespace(current_epoch=current_epoch, should_stop=False)  # as Lightning's, counted per fit
    module = SimpleNamespace(epoch_metrics=lambda: {"val_loss": val_loss})
    gate.on_train_epoch_end(trainer, module)
    return trainer


def test_an_epoch_worse_than_the_frozen_stage_stops_fine_tuning_at_the_gate():
    gate = FrozenStageGate(baseline=0.178, epochs=1)
    assert _epoch(gate, 0, 0.192).should_stop and gate.stopped


def test_an_epoch_that_beats_the_frozen_stage_lets_fine_tuning_go_on():
    gate = FrozenStageGate(baseline=0.406, epochs=1)
    assert not _epoch(gate, 0, 0.231).should_stop
    assert not _epoch(gate, 1, 0.5).should_stop  # after the gate, only early stopping decides


def test_the_gate_waits_for_its_epoch_and_counts_epochs_before_a_resume():
    gate = FrozenStageGate(baseline=0.2, epochs=2)
    assert not _epoch(gate, 0, 0.3).should_stop
    assert _epoch(gate, 1, 0.25).should_stop
    resumed = FrozenStageGate(baseline=0.2, epochs=2, losses=[0.1])
    assert not _epoch(resumed, 0, 0.25).should_stop  # epoch 1 (before the resume) beat it
    assert beat_frozen_stage([0.3, 0.19], 0.2) and not beat_frozen_stage([0.2], 0.2)


def test_the_default_gate_does_not_judge_fine_tuning_by_its_first_epoch_alone():
    """The digits demo (seed 0, torch 2.14): head val loss 0.406; fine-tuning epoch 1, near the
    one-cycle peak LR, 0.444; epoch 2 0.167, epoch 3 0.145 (accuracy 0.905 -> 0.992)."""
    gate = FrozenStageGate(baseline=0.406, epochs=TrainConfig().finetune_gate)
    assert not _epoch(gate, 0, 0.444).should_stop
    assert not _epoch(gate, 1, 0.167).should_stop and not gate.stopped


def test_the_command_line_defaults_are_the_configuration_defaults():
    """One source of truth: `transferlab train` without options is `transferlab.train(data)`: its options are
    generated from TrainConfig's fields (tests/test_cli_defaults.py checks help, panels and literals)."""
    import dataclasses
    import inspect

    from transferlab import cli

    config = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
              for f in dataclasses.fields(TrainConfig)}
    options = {name: p.default for name, p in inspect.signature(cli.train).parameters.items()
               if name in config and name != "data"}
    assert len(options) > 30 and options == {name: config[name] for name in options}
    assert options["finetune_gate"] == TrainConfig().finetune_gate


@pytest.mark.parametrize("beats, finetune_rows", [(False, 1), (True, 3)])
def test_two_stage_runs_stop_fine_tuning_only_when_it_does_not_pay(tiny_data, tmp_path, monkeypatch, beats,
                                                                   finetune_rows):
    monkeypatch.setattr(gate_mod, "beat_frozen_stage", lambda losses, baseline: beats)
    result = transferlab.train(tiny_data, out=str(tmp_path / "run"),
                               **{**TINY, "epochs_finetune": 3, "finetune_gate": 1})
    rows = read_metrics(result.run_dir)
    assert sum(r["phase"] == "finetune" for r in rows) == finetune_rows
    state = json.loads((result.run_dir / "state.json").read_text())
    frozen_losses = [float(r["val_loss"]) for r in rows if r["phase"] == "frozen"]
    assert min(abs(state["frozen_val_loss"] - v) for v in frozen_losses) < 1e-5  # the head fine-tuning started from
    assert state.get("finetune_stopped_early", False) is not beats


def test_a_run_resumed_after_the_gate_epoch_decides_as_the_first_run_did(tiny_data, tmp_path, monkeypatch):
    """Killed between the gate epoch's checkpoint and the stop being recorded: the resume stops too."""
    result = transferlab.train(tiny_data, out=str(tmp_path / "run"), **{**TINY, "epochs_finetune": 3, "finetune_gate": 0})
    run_dir = result.run_dir
    # rewind the record to "epoch 1 of 3 done, not stopped", with a gate that epoch 1 did not pass
    state = json.loads((run_dir / "state.json").read_text())
    state["finetune_epochs_done"], state["status"] = 1, "running"
    state["frozen_val_loss"] = -1.0  # nothing beats it
    state["rows"] = [r for r in state["rows"] if r["phase"] == "frozen" or r["epoch"] == 1]
    (run_dir / "state.json").write_text(json.dumps(state))
    cfg = TrainConfig.load(run_dir / "config.yaml")
    cfg.finetune_gate = 1
    cfg.save(run_dir / "config.yaml")
    monkeypatch.setattr(run_mod, "load_training_state", lambda last: pytest.fail("fine-tuning should not restart"))
    resumed = transferlab.train(resume=run_dir)
    assert sum(r["phase"] == "finetune" for r in resumed.rows) == 1
