"""A run directory's life: a run that fails before its first epoch leaves nothing behind; resuming a
finished run says so and changes nothing (test_run_extend.py: unless it asks for more epochs)."""

from __future__ import annotations

import os

from conftest import TINY, make_image_folder
from guarantees import TINY_FLAGS, cli

import transferlab


def test_a_run_that_fails_before_its_first_epoch_leaves_no_directory(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=("red",))  # the data check fails once the run dir is open
    r = cli("train", data, "--out", tmp_path / "run", *TINY_FLAGS)
    assert r.code != 0 and "Traceback" not in r.text
    assert not (tmp_path / "run").exists()


def test_an_existing_empty_out_directory_is_kept_but_not_filled_by_a_failed_run(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=("red",))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's own file")
    r = cli("train", data, "--out", tmp_path / "mine", *TINY_FLAGS)
    assert r.code != 0
    assert (tmp_path / "mine" / "notes.txt").read_text() == "the user's own file"  # a directory it did not create
    assert sorted(os.listdir(tmp_path / "mine")) == ["notes.txt"]  # no train.log, lock or config left


def test_resuming_a_finished_run_says_so_and_redoes_nothing(tmp_path):
    data = make_image_folder(tmp_path / "data")
    first = transferlab.train(data, out=str(tmp_path / "run"), **{**TINY, "epochs_finetune": 1, "report": True})
    watched = [first.run_dir / n for n in ("metrics.csv", "summary.json", "evaluation.json", "report.html")]
    watched = [p for p in watched if p.exists()]
    assert watched, "the run wrote none of its outputs"
    before = {p: os.stat(p).st_mtime_ns for p in watched}
    r = cli("train", "--resume", first.run_dir)
    assert r.code == 0, r.text
    assert "finished run" in r.text and "nothing to resume" in r.text
    r = cli("train", "--resume", first.run_dir, "--epochs-finetune", "1")  # not above the 1 it did
    assert r.code == 0, r.text
    assert "nothing to resume" in r.text and "--epochs-finetune 1 is not above the 1 it did" in r.text
    assert {p: os.stat(p).st_mtime_ns for p in watched} == before
    again = transferlab.train(resume=first.run_dir)
    assert again.val_accuracy_best == first.val_accuracy_best and again.rows == first.rows
