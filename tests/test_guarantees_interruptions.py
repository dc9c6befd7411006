"""Interruptions: a run killed with SIGKILL at any point resumes to the very run it would have been.

The kills are real (`kill -9` of a `python -m transferlab train` process). To kill *during* a phase
rather than at a lucky moment, the child pauses at a named point (transferlab/_testing.py) and
signals it by creating a file; the test then kills it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY, make_image_folder
from guarantees import TINY_FLAGS, cli, metrics_without_timings, read_metrics
from safetensors.torch import load_file

import transferlab
from transferlab.training import run as run_module
from transferlab.training.checkpoint import tensors_path


def _start(args: list, pause_at: str | None, marker: Path) -> subprocess.Popen:
    env = {**os.environ, "TRANSFERLAB_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    if pause_at:
        env |= {"TRANSFERLAB_PAUSE_AT": pause_at, "TRANSFERLAB_PAUSE_FILE": str(marker)}
    return subprocess.Popen([sys.executable, "-m", "transferlab", "train", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _kill_when_paused(proc: subprocess.Popen, marker: Path) -> None:
    deadline = time.monotonic() + 240
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"child never reached its pause point (rc {proc.returncode}):\n{out}\n{err}")
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


@pytest.fixture
def reference(tiny_run):
    """The uninterrupted run: same data (make_image_folder), same options, same seed."""
    return tiny_run


def test_kill_9_during_feature_extraction_and_during_fine_tuning_then_resume_equals_an_uninterrupted_run(
        tmp_path, reference):
    data = make_image_folder(tmp_path / "data")
    run = tmp_path / "run"

    # 1. killed while extracting features: after the first batch, before the val features
    proc = _start([data, *TINY_FLAGS, "--out", run], "extract_batch:1", tmp_path / "paused1")
    _kill_when_paused(proc, tmp_path / "paused1")
    assert not (run / "metrics.csv").exists() and not (run / "checkpoints").exists()

    # 2. resumed, then killed in the middle of fine-tuning epoch 2 (3 steps per epoch)
    proc = _start(["--resume", run], "finetune_step:5", tmp_path / "paused2")
    _kill_when_paused(proc, tmp_path / "paused2")
    state = json.loads((run / "state.json").read_text())
    assert state["frozen_done"] and state["finetune_epochs_done"] == 1 and state["status"] == "running"
    assert [r["phase"] for r in read_metrics(run)] == ["frozen"] * 3 + ["finetune"]

    # 3. resumed to the end
    proc = _start(["--resume", run], None, tmp_path / "unused")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "val_accuracy=" in out
    # the very run: same metrics (timing columns aside), same best epoch, bit-identical weights —
    # which also shows determinism across processes (the reference ran in this one)
    assert metrics_without_timings(run) == metrics_without_timings(reference)
    assert json.loads((run / "summary.json").read_text())["best"] == json.loads(
        (reference / "summary.json").read_text())["best"]
    mine, theirs = load_file(run / "model.safetensors"), load_file(reference / "model.safetensors")
    assert mine.keys() == theirs.keys() and all(mine[k].equal(theirs[k]) for k in mine)
    assert not list(run.rglob("*.tmp")), "a killed write left a temp file in the run directory"


def test_kill_between_checkpoint_and_state_json_loses_nothing(tiny_data, tmp_path, monkeypatch, reference):
    """The checkpoint is the epoch's commit point: state.json lagging one epoch behind it is caught up."""
    real_save = run_module.RunState.save

    def die_after_checkpoint_of_epoch_2(self):
        if self.finetune_epochs_done == 2 and (self.run_dir.checkpoints / "last.json").exists():
            raise RuntimeError("killed")  # as if killed right after the checkpoint's rename
        real_save(self)

    monkeypatch.setattr(run_module.RunState, "save", die_after_checkpoint_of_epoch_2)
    with pytest.raises(RuntimeError, match="killed"):
        transferlab.train(tiny_data, out=str(tmp_path / "run"), **TINY)
    assert json.loads((tmp_path / "run" / "state.json").read_text())["finetune_epochs_done"] == 1
    monkeypatch.setattr(run_module.RunState, "save", real_save)
    resumed = transferlab.train(resume=tmp_path / "run")
    assert metrics_without_timings(resumed.run_dir) == metrics_without_timings(reference)


@pytest.mark.parametrize("damage", ["truncated state.json", "truncated checkpoint tensors",
                                    "checkpoint JSON from another save"])
def test_half_written_run_files_are_never_read_as_valid(tmp_path, reference, damage):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    state = json.loads((run / "state.json").read_text())
    state.update(status="running", finetune_epochs_done=1)  # as if interrupted after epoch 1
    (run / "state.json").write_text(json.dumps(state))
    if damage == "truncated state.json":
        text = (run / "state.json").read_text()
        (run / "state.json").write_text(text[: len(text) // 2])
        expected = f"{run / 'state.json'} is unreadable or corrupt"
    elif damage == "truncated checkpoint tensors":
        tensors = tensors_path(run / "checkpoints" / "last")
        tensors.write_bytes(tensors.read_bytes()[:1000])
        expected = f"{tensors} is not a valid safetensors file"
    else:
        meta = json.loads((run / "checkpoints" / "last.json").read_text())
        meta["state_id"] = "0" * 32
        (run / "checkpoints" / "last.json").write_text(json.dumps(meta))
        expected = "(different saves); this checkpoint cannot be resumed from"
    r = cli("train", "--resume", run)
    assert r.code == 2 and "Traceback" not in r.text
    assert expected in r.text
