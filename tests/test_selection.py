"""`transferlab select`: Pareto front and ranking (pure), probes and learning curves, and the command end to end."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import TINY
from typer.testing import CliRunner

import transferlab
from transferlab.cli import app
from transferlab.evaluation.probe import cv_folds, learning_curve, learning_curve_sizes, linear_probe
from transferlab.workflows.select import SELECTION_COLUMNS, candidate_names, pareto_front, rank_candidates

SELECT = {"pretrained": False, "img_size": 32, "progress": False}


def test_pareto_front_drops_every_dominated_point():
    # (latency, accuracy): lower latency and higher accuracy are better
    points = [(10, 0.90), (20, 0.95), (15, 0.85), (30, 0.95), (5, 0.70)]
    assert pareto_front(points) == [4, 0, 1]  # (15, .85) loses to (10, .90); (30, .95) to (20, .95)


def test_pareto_front_keeps_identical_points_and_resolves_ties():
    assert pareto_front([(10, 0.9), (10, 0.9), (10, 0.8)]) == [0, 1]  # same latency: the less accurate goes
    assert pareto_front([(10, 0.9), (12, 0.9)]) == [0]  # same accuracy: the slower goes
    assert pareto_front([(1, 0.5)]) == [0]


def _row(name, accuracy, latency):
    return {"backbone": name, "probe_accuracy": accuracy, "latency_ms_b1": latency}


def test_ranking_recommends_the_most_accurate_within_budget_ties_to_lower_latency():
    rows = [_row("big", 0.95, 30.0), _row("mid", 0.93, 12.0), _row("small", 0.93, 8.0), _row("tiny", 0.80, 2.0)]
    ordered, recommended = rank_candidates(rows, budget_ms=20)
    assert [r["backbone"] for r in ordered] == ["big", "small", "mid", "tiny"]
    assert [r["rank"] for r in ordered] == [1, 2, 3, 4]
    assert recommended["backbone"] == "small"  # "big" is over budget; "small" ties "mid" and is faster
    assert [r["within_budget"] for r in ordered] == [False, True, True, True]
    assert [r["recommended"] for r in ordered] == [False, True, False, False]
    assert "recommended" not in rows[0]  # inputs are not modified


def test_ranking_without_budget_takes_the_most_accurate_and_an_impossible_budget_recommends_none():
    rows = [_row("big", 0.95, 30.0), _row("tiny", 0.80, 2.0)]
    assert rank_candidates(rows)[1]["backbone"] == "big"
    ordered, recommended = rank_candidates(rows, budget_ms=1.0)
    assert recommended is None and not any(r["within_budget"] or r["recommended"] for r in ordered)


@pytest.mark.parametrize("counts, sizes", [([124, 121], [1, 2, 5, 10, 20, 124]), ([12, 6], [1, 2, 5, 10, 12]),
                                           ([3, 3], [1, 2, 3]), ([1, 1], [1]), ([20, 4], [1, 2, 5, 10, 20])])
def test_learning_curve_sizes_are_the_steps_below_the_largest_class_then_all(counts, sizes):
    assert learning_curve_sizes(counts) == sizes


def _blobs(per_class, seed=0, dim=8):
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(3.0 * c, 1.0, size=(n, dim)) for c, n in enumerate(per_class)])
    y = np.concatenate([np.full(n, c) for c, n in enumerate(per_class)])
    return x.astype(np.float32), y


def test_learning_curve_fits_each_size_per_class_on_cached_features():
    x, y = _blobs([12, 6])
    vx, vy = _blobs([5, 5], seed=1)
    points = learning_curve(x, y, vx, vy, c=1.0)
    assert [p["per_class"] for p in points] == [1, 2, 5, 10, 12]
    assert [p["images"] for p in points] == [2, 4, 10, 16, 18]  # the smaller class gives all it has
    assert [p["all"] for p in points] == [False, False, False, False, True]
    assert points[-1]["accuracy"] == 1.0  # well-separated blobs


def test_probe_folds_are_limited_by_the_smallest_class():
    assert cv_folds([0] * 10 + [1] * 3) == 3
    assert cv_folds([0] * 10 + [1] * 30) == 5
    assert cv_folds([0] * 10 + [1]) == 0
    x, y = _blobs([10, 10])
    vx, vy = _blobs([4, 4], seed=2)
    probe = linear_probe(x, y, vx, vy)
    assert probe.folds == 5 and probe.val_accuracy == 1.0 and probe.cv_accuracy == 1.0
    assert set(probe.cv_scores) == {"0.01", "0.1", "1.0", "10.0"}
    lonely = linear_probe(*_blobs([10, 1]), vx, vy)  # a single image in a class: no CV, default C
    assert lonely.folds == 0 and lonely.cv_accuracy is None and lonely.c == 1.0


def test_candidates_must_be_named_or_filtered():
    assert candidate_names(" a, b ,a,") == ["a", "b"]
    with pytest.raises(transferlab.TransferlabError, match="--backbones"):
        candidate_names(None)


def test_select_runs_one_forward_pass_per_image_per_backbone_and_shares_the_training_cache(
        tiny_data, tmp_path, extraction_calls):
    calls = extraction_calls
    out = tmp_path / "sel"
    result = transferlab.select(tiny_data, "test_efficientnet,test_resnet", out=out, budget_ms=1e6, **SELECT)
    # 24 train + 12 val images, once for each backbone: the C sweep, CV and learning curve add nothing
    assert sorted(calls) == [12, 12, 24, 24]
    for name in ("selection.csv", "selection.json", "selection.png", "learning_curve.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    with open(out / "selection.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == SELECTION_COLUMNS
        assert sorted(r["backbone"] for r in reader) == ["test_efficientnet", "test_resnet"]
    saved = json.loads((out / "selection.json").read_text())
    assert saved["recommended"] == result.recommended["backbone"] == result.rows[0]["backbone"]
    assert set(saved["learning_curves"]) == {"test_efficientnet", "test_resnet"}
    assert [p["per_class"] for p in saved["learning_curves"]["test_resnet"]] == [1, 2, 5, 10, 12]
    row = result.rows[0]
    assert row["probe_accuracy"] >= 0.9  # tinted squares: anything near chance means the probe is broken
    assert row["latency_ms_b1"] > 0 and row["latency_ms_b32"] > 0 and row["peak_mem_mb"] >= row["weights_mb"] > 0
    assert result.seconds["ratio"] is not None and result.seconds["ratio"] >= 1.0

    again = transferlab.select(tiny_data, "test_efficientnet,test_resnet", out=tmp_path / "again", **SELECT)
    assert len(calls) == 4 and again.seconds["ratio"] is None  # all from the cache
    transferlab.train(tiny_data, out=str(tmp_path / "run"), **{**TINY, "backbone": "test_resnet",
                                                              "strategy": "head-only"})
    assert len(calls) == 4  # training starts from the features select cached


def test_select_command_prints_the_table_recommendation_and_cost_ratio(tiny_data, tmp_path):
    result = CliRunner().invoke(app, ["select", str(tiny_data), "--backbones", "test_convnext", "--no-pretrained",
                                      "--img-size", "32", "--budget-ms", "100000", "--out", str(tmp_path / "s"),
                                      "--no-progress"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "test_convnext" in result.stdout
    assert "recommended: test_convnext" in result.stdout
    assert "× its feature extraction" in result.stdout
