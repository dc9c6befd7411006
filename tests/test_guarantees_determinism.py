"""Determinism on CPU: the same data, options and seed give the same run.

Same seed twice in one process: tests/test_training.py::test_same_seed_gives_identical_metrics; across
processes, with bit-identical weights: the kill -9 test in test_guarantees_interruptions.py (a run
killed twice and resumed in fresh processes equals the uninterrupted one). This file adds predictions
and shows the comparison is sensitive at all.
"""

from __future__ import annotations

from conftest import TINY, make_image_folder
from guarantees import metrics_without_timings

import transferlab


def test_a_different_seed_gives_a_different_run(tmp_path, tiny_run):
    """The equality checks elsewhere can fail: the seed does reach the numbers."""
    data = make_image_folder(tmp_path / "data")
    other = transferlab.train(data, out=str(tmp_path / "seed1"), **{**TINY, "seed": 1, "strategy": "head-only"})
    frozen = [r for r in metrics_without_timings(tiny_run) if r["phase"] == "frozen"]
    assert metrics_without_timings(other.run_dir) != frozen


def test_same_run_gives_identical_predictions_across_processes(tmp_path, tiny_run):
    """Predicting in a fresh process gives exactly the probabilities this process computes."""
    import json
    import os
    import subprocess
    import sys

    images = sorted((tiny_run.parent / "data" / "val").rglob("*.png"))
    here = transferlab.predict(tiny_run, images, top_k=2)
    env = {**os.environ, "TRANSFERLAB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "transferlab", "predict", str(tiny_run), *map(str, images),
                        "--top-k", "2", "--json"], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == json.loads(json.dumps(here))
