"""Determinism on CPU: the same data, options and seed give the same run — metrics (timing columns
aside), weights and predictions — whether the feature cache was cold or warm."""

from __future__ import annotations

from conftest import TINY, make_image_folder
from guarantees import metrics_without_timings
from safetensors.torch import load_file

import transferlab


def test_same_seed_gives_identical_metrics_weights_and_predictions(tmp_path, tiny_run):
    data = make_image_folder(tmp_path / "data")  # same images as tiny_run's, in another folder
    again = transferlab.train(data, out=str(tmp_path / "again"), **TINY)  # cold cache: a fresh home
    assert metrics_without_timings(again.run_dir) == metrics_without_timings(tiny_run)
    first, second = load_file(tiny_run / "model.safetensors"), load_file(again.run_dir / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(first[k].equal(second[k]) for k in first)
    images = sorted((data / "val").rglob("*.png"))
    mine = transferlab.predict(again.run_dir, images)
    theirs = transferlab.predict(tiny_run, [tiny_run.parent / "data" / p.relative_to(data) for p in images])
    assert [m["predictions"] for m in mine] == [t["predictions"] for t in theirs]


def test_a_different_seed_gives_a_different_run(tmp_path, tiny_run):
    """The comparison above can fail: the seed does reach the numbers."""
    data = make_image_folder(tmp_path / "data")
    other = transferlab.train(data, out=str(tmp_path / "seed1"), **{**TINY, "seed": 1, "strategy": "head-only"})
    frozen = [r for r in metrics_without_timings(tiny_run) if r["phase"] == "frozen"]
    assert metrics_without_timings(other.run_dir) != frozen
