"""Evaluation: metrics against an independent scikit-learn computation, calibration, interpretation,
TTA, the data an evaluation reads (own split, other folders, bad files) and the `evaluate` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from conftest import COLOURS, TINY, make_image
from sklearn import metrics as skm

import transferlab
from transferlab.data import load_splits
from transferlab.errors import DataError, RunDirError
from transferlab.evaluation.evaluate import evaluate_run, load_eval
from transferlab.evaluation.interpret import most_confused, per_class_accuracy, top_losses
from transferlab.evaluation.metrics import classification_metrics


def cli(*args):
    env = {**os.environ, "TRANSFERLAB_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "transferlab", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300, check=False)


def class_folders(root, counts: dict[str, int], seed: int = 0):
    """root/<class>/*.png, tinted by class (any name; unknown names get a grey tint)."""
    rng = np.random.default_rng(seed)
    for name, n in counts.items():
        for i in range(n):
            make_image(root / name / f"{i}.png", COLOURS.get(name, (128, 128, 128)), rng)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run shared by the tests here: 3 classes in class folders (split by val_split/seed)."""
    root = tmp_path_factory.mktemp("evaluation")
    data = class_folders(root / "data", {"blue": 10, "green": 10, "red": 10})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRANSFERLAB_HOME", str(root / "home"))
        mp.setenv("TRANSFERLAB_OFFLINE", "1")
        result = transferlab.train(data, out=str(root / "run"), strategy="head-only", feature_cache="memory", **TINY)
    return result, data


def random_predictions(n: int, n_classes: int, seed: int = 0, absent: int | None = None):
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, n_classes, n)
    if absent is not None:
        targets[targets == absent] = (absent + 1) % n_classes
    logits = rng.normal(size=(n, n_classes))
    logits[np.arange(n), targets] += 1.5
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return probs.astype(np.float32), targets


# --- metrics ------------------------------------------------------------------------------------


@pytest.mark.parametrize("absent", [None, 3], ids=["all-classes", "class-3-absent"])
def test_metrics_match_sklearn_on_the_same_predictions(absent):
    n_classes = 7
    probs, y = random_predictions(300, n_classes, absent=absent)
    classes = [f"c{i}" for i in range(n_classes)]
    m = classification_metrics(probs, y, classes)
    labels = list(range(n_classes))
    pred = probs.argmax(axis=1)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["top_k"] == 5
    assert m["top_k_accuracy"] == pytest.approx(skm.top_k_accuracy_score(y, probs, k=5, labels=labels))
    assert m["top_k_accuracy"] > m["accuracy"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true": the absent class
        assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    probs64 = probs.astype(np.float64) / probs.astype(np.float64).sum(axis=1, keepdims=True)
    assert m["log_loss"] == pytest.approx(skm.log_loss(y, probs64, labels=labels))
    p, r, f, s = skm.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    assert [row["class"] for row in m["per_class"]] == classes
    assert [row["precision"] for row in m["per_class"]] == pytest.approx(p)
    assert [row["recall"] for row in m["per_class"]] == pytest.approx(r)
    assert [row["f1"] for row in m["per_class"]] == pytest.approx(f)
    assert [row["support"] for row in m["per_class"]] == s.tolist()
    for avg in ("macro", "weighted"):
        expected = skm.precision_recall_fscore_support(y, pred, labels=labels, average=avg, zero_division=0)[:3]
        assert [m[avg][k] for k in ("precision", "recall", "f1")] == pytest.approx(expected)
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=labels).tolist()
    assert len(m["confusion_matrix"]) == n_classes
    assert m["absent_classes"] == ([] if absent is None else ["c3"])
    if absent is not None:
        row = m["per_class"][absent]
        assert row["support"] == 0 and row["recall"] == 0.0
    json.dumps(m)  # the metrics go into eval-*.json as they are


def test_top_k_is_capped_at_the_number_of_classes():
    probs, y = random_predictions(50, 3)
    m = classification_metrics(probs, y, ["a", "b", "c"])
    assert m["top_k"] == 3 and m["top_k_accuracy"] == 1.0


def test_ece_matches_a_hand_computed_example():
    # confidences 0.95 (right), 0.85 (wrong), 0.82 (right), 0.55 (right); bins are 1/15 wide:
    # {0.95}: |1 - 0.95| = 0.05; {0.85, 0.82}: |0.5 - 0.835| = 0.335; {0.55}: |1 - 0.55| = 0.45
    # ECE = 0.05/4 + 0.335*2/4 + 0.45/4 = 0.2925
    probs = np.array([[0.95, 0.05], [0.85, 0.15], [0.18, 0.82], [0.45, 0.55]])
    y = np.array([0, 1, 1, 1])
    m = classification_metrics(probs, y, ["a", "b"])
    assert m["ece"] == pytest.approx(0.2925, abs=1e-6)
    full = {round(b["lower"] * 15): b for b in m["reliability"] if b["count"]}
    assert sorted(full) == [8, 12, 14]
    assert full[12]["count"] == 2 and full[12]["accuracy"] == 0.5
    assert full[12]["confidence"] == pytest.approx(0.835)
    assert len(m["reliability"]) == 15


def test_reliability_bins_add_up_to_the_ece_even_with_saturated_confidences():
    probs, y = random_predictions(500, 4, seed=1)
    probs[:20] = 0.0
    probs[np.arange(20), y[:20]] = 1.0  # confidence exactly 1.0, as float32 softmax produces
    m = classification_metrics(probs, y, list("abcd"))
    bins = m["reliability"]
    assert sum(b["count"] for b in bins) == 500
    from_bins = sum(b["count"] / 500 * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"])
    assert m["ece"] == pytest.approx(from_bins, abs=1e-5)
    assert 0.0 < m["ece"] < 1.0


# --- interpretation -----------------------------------------------------------------------------


def test_most_confused_pairs_are_off_diagonal_and_sorted_by_count():
    cm = [[9, 1, 4], [0, 7, 2], [4, 6, 3]]
    pairs = most_confused(cm, ["a", "b", "c"])
    assert [(p["true"], p["predicted"], p["count"]) for p in pairs] == [
        ("c", "b", 6), ("a", "c", 4), ("c", "a", 4), ("b", "c", 2), ("a", "b", 1)]


def test_top_losses_are_the_least_likely_true_classes_in_order():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.99, 0.01]])
    y = np.array([0, 0, 1, 1])
    losses = top_losses(probs, y, ["p0", "p1", "p2", "p3"], ["a", "b"], n=3)
    assert [x["path"] for x in losses] == ["p3", "p1", "p2"]
    assert losses[0]["loss"] == pytest.approx(-np.log(0.01))
    assert (losses[0]["true"], losses[0]["predicted"], losses[0]["probability"]) == ("b", "a", pytest.approx(0.99))
    assert [x["loss"] for x in losses] == sorted((x["loss"] for x in losses), reverse=True)


def test_per_class_accuracy_is_recall_and_none_without_images():
    assert per_class_accuracy([[3, 1], [0, 0]], ["a", "b"]) == {"a": 0.75, "b": None}


# --- evaluating runs ----------------------------------------------------------------------------


def test_default_evaluation_reproduces_the_runs_validation_split_and_accuracy(trained):
    run, data = trained
    result = evaluate_run(run.run_dir, progress=False)
    val = load_splits(data, val_split=0.2, seed=0, progress=False).val
    assert result.paths == [str(s.path) for s in val]
    assert result.targets.tolist() == [s.label for s in val]
    assert result.name == "val" and result.json_path == run.run_dir / "eval-val.json"
    assert abs(result.accuracy - run.val_accuracy_best) <= 1 / len(val) + 1e-9
    saved = load_eval(result.json_path)
    assert saved["metrics"]["accuracy"] == result.accuracy
    assert saved["classes"] == ["blue", "green", "red"]
    assert len(saved["interpretation"]["top_losses"]) == min(16, len(val))
    assert np.allclose(result.probabilities.sum(axis=1), 1.0)


def test_tta_reports_its_metrics_beside_the_plain_ones(trained):
    run, _ = trained
    plain = evaluate_run(run.run_dir, progress=False)
    result = evaluate_run(run.run_dir, tta=True, progress=False)
    assert result.tta_metrics is not None and 0.0 <= result.tta_metrics["accuracy"] <= 1.0
    assert np.allclose(result.tta_probabilities.sum(axis=1), 1.0)
    assert not np.allclose(result.tta_probabilities, result.probabilities)  # views did change something
    assert np.allclose(result.probabilities, plain.probabilities, atol=1e-6)  # plain scores unchanged
    saved = load_eval(result.json_path)
    assert saved["tta"]["views"][0] == "full" and len(saved["tta"]["views"]) >= 2
    assert saved["tta"]["metrics"]["accuracy"] == result.tta_metrics["accuracy"]


def test_other_data_skips_corrupt_images_and_lists_them(trained, tmp_path):
    run, _ = trained
    new = class_folders(tmp_path / "new_reds", {"red": 5}, seed=7)
    broken = new / "red" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    result = evaluate_run(run.run_dir, new, progress=False)
    assert [s["path"] for s in result.skipped] == [str(broken)]
    assert result.metrics["n"] == 5 and str(broken) not in result.paths
    # one class of new photos is valid evaluation data: the others are reported absent
    assert result.metrics["absent_classes"] == ["blue", "green"]
    assert result.name == "new_reds-all" and (run.run_dir / "eval-new_reds-all.json").is_file()


def test_split_folder_of_other_data_is_chosen_and_a_missing_one_is_an_error(trained, tmp_path):
    run, _ = trained
    class_folders(tmp_path / "tree" / "train", {"red": 2, "blue": 2})
    class_folders(tmp_path / "tree" / "test", {"red": 3, "blue": 1}, seed=1)
    result = evaluate_run(run.run_dir, tmp_path / "tree", split="test", progress=False)
    assert result.metrics["n"] == 4 and all("/test/" in p for p in result.paths)
    assert result.name == "tree-test"
    with pytest.raises(DataError, match="no val/ folder"):
        evaluate_run(run.run_dir, tmp_path / "tree", split="val", progress=False)


def test_a_class_the_model_does_not_know_is_a_data_error_naming_it(trained, tmp_path):
    run, _ = trained
    data = class_folders(tmp_path / "odd", {"red": 2, "purple": 2})
    with pytest.raises(DataError, match="purple"):
        evaluate_run(run.run_dir, data, progress=False)


def test_a_missing_run_directory_is_a_run_dir_error(tmp_path):
    with pytest.raises(RunDirError, match="does not exist"):
        evaluate_run(tmp_path / "no-such-run", progress=False)


def test_evaluate_command_prints_tables_and_exits_2_on_user_errors(trained, tmp_path):
    run, _ = trained
    p = cli("evaluate", run.run_dir, "--tta", "--no-progress")
    assert p.returncode == 0, p.stderr
    assert "with TTA" in p.stdout and "per class" in p.stdout and "green" in p.stdout
    assert "accuracy=" in p.stdout and "tta_accuracy=" in p.stdout
    assert "Traceback" not in p.stdout + p.stderr

    p = cli("evaluate", tmp_path / "nope", "--no-progress")
    assert p.returncode == 2 and "does not exist" in p.stderr
    assert "Traceback" not in p.stdout + p.stderr
