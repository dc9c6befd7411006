"""Multi-label classification end to end: a path,labels CSV → training (BCE, mAP selection, thresholds
tuned on val) → evaluate (mAP, F1, subset accuracy) → predict --json label sets → ONNX parity → the API."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from conftest import TINY, make_image
from guarantees import TINY_FLAGS, cli
from multilabel_data import SHAPES, make_shapes_csv

import transferlab
from transferlab.data.sources import load_splits
from transferlab.errors import DataError, TransferlabError
from transferlab.evaluation.multilabel_metrics import multilabel_metrics
from transferlab.training import objective
from transferlab.training.thresholds import tune_thresholds

# The smallest setup found to reach mAP >= 0.9 on the shapes with the random-init test backbone: its
# frozen features, a linear head at a high LR for 60 cheap epochs on them (fine-tuning it with
# BatchNorm in train mode moved features the head had fitted, and lost mAP).
SHAPES_FLAGS = [f for f in TINY_FLAGS]
SHAPES_FLAGS[SHAPES_FLAGS.index("--epochs-frozen") + 1] = "60"
SHAPES_FLAGS[SHAPES_FLAGS.index("--lr-head") + 1] = "1.0"
SHAPES_FLAGS += ["--strategy", "head-only"]


def _write_csv(path, rows, header=("path", "labels")):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _coloured(tmp_path, n=12):
    rng = np.random.default_rng(0)
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    return [make_image(tmp_path / f"{i}.png", colours[i % 3], rng).name for i in range(n)]


# ---- data ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sep", [";", "|"])
def test_csv_with_several_labels_per_row_is_multilabel_and_its_separator_detected(tmp_path, sep):
    names = _coloured(tmp_path)
    rows = [(name, sep.join(["a", "b"] if i % 2 else ["c"])) for i, name in enumerate(names)]
    splits = load_splits(_write_csv(tmp_path / "l.csv", rows), task="auto", progress=False)
    assert splits.multilabel and splits.label_sep == sep and splits.classes == ["a", "b", "c"]
    samples = {s.path.name: s for s in splits.train + splits.val}
    assert [splits.classes[i] for i in samples[names[1]].labels] == ["a", "b"]
    assert samples[names[0]].label_set == (2,)
    # positives per label, not images per class
    total = {c: splits.counts()["train"][c] + splits.counts()["val"][c] for c in splits.classes}
    assert total == {"a": 6, "b": 6, "c": 6}
    assert splits.to_summary()["task"] == "multilabel"


def test_auto_keeps_a_one_label_per_row_csv_single_label(tmp_path):
    names = _coloured(tmp_path)
    splits = load_splits(_write_csv(tmp_path / "l.csv", [(n, "ab"[i % 2]) for i, n in enumerate(names)],
                                    header=("path", "label")), task="auto", progress=False)
    assert not splits.multilabel and all(not s.labels for s in splits.train)


def test_multilabel_csv_keeps_the_csv_validation_and_reports_rare_labels(tmp_path):
    names = _coloured(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    rows = [(n, "a|b" if i % 2 else "a") for i, n in enumerate(names)]
    make_image(tmp_path / "rare.png", (90, 90, 90), np.random.default_rng(1))
    rows += [("broken.png", "a|b"), ("../outside.png", "a"), (names[0], "b"), ("rare.png", "a|rare")]
    splits = load_splits(_write_csv(tmp_path / "l.csv", rows), task="multilabel", label_sep="|", progress=False)
    reasons = " ".join(s["reason"] for s in splits.skipped)
    assert "outside the CSV's folder" in reasons and "listed again" in reasons
    assert any(s["path"].endswith("broken.png") for s in splits.skipped)
    assert any("fewer than 5 training images" in w and "rare" in w for w in splits.warnings)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"task": "multilabel"}, "is not a CSV"),
    ({"task": "sometimes"}, "is not one of auto, single, multilabel"),
    ({"task": "single", "label_sep": ";"}, "needs --task multilabel"),
    ({"task": "auto", "label_sep": "ab"}, "one character"),
])
def test_bad_task_options_are_clear_errors(tmp_path, kwargs, message):
    (tmp_path / "a").mkdir()
    with pytest.raises(DataError, match=message):
        load_splits(tmp_path, progress=False, **kwargs)


def test_cells_mixing_both_separators_ask_for_label_sep(tmp_path):
    names = _coloured(tmp_path, 4)
    rows = [(names[0], "a;b"), (names[1], "a|c"), (names[2], "a"), (names[3], "b")]
    with pytest.raises(DataError, match="--label-sep"):
        load_splits(_write_csv(tmp_path / "l.csv", rows), task="auto", progress=False)


def test_train_refuses_bad_task_options_before_any_work(tmp_path):
    (tmp_path / "a").mkdir()
    r = cli("train", tmp_path, "--task", "multilabel", "--out", tmp_path / "run", *TINY_FLAGS)
    assert r.code != 0 and "is not a CSV" in r.text and not (tmp_path / "run").exists()
    r = cli("train", tmp_path, "--thresholds", "recall:2", "--out", tmp_path / "run", *TINY_FLAGS)
    assert r.code != 0 and "precision:P" in r.text and not (tmp_path / "run").exists()
    with pytest.raises(TransferlabError, match="one device"):
        transferlab.TrainConfig(data=str(tmp_path), task="multilabel", devices=2).validate()


# ---- objective, thresholds, metrics ---------------------------------------------------------------------


def test_objective_scores_multi_hot_targets_by_bce_and_map():
    logits = torch.tensor([[4.0, -4.0], [-4.0, 4.0], [3.0, 3.0]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert objective.loss(logits, y).item() == pytest.approx(
        torch.nn.functional.binary_cross_entropy_with_logits(logits, y).item())
    smoothed = torch.nn.functional.binary_cross_entropy_with_logits(logits, y * 0.9 + 0.05).item()
    assert objective.loss(logits, y, label_smoothing=0.1).item() == pytest.approx(smoothed)  # toward 1/2
    tally = objective.Tally()
    tally.add(logits[:2], y[:2])
    tally.add(logits[2:], y[2:])
    assert tally.multilabel and tally.value() == pytest.approx(1.0)
    wrong = objective.Tally()
    wrong.add(-logits, y)
    assert wrong.value() < 0.8
    single = objective.Tally()
    single.add(logits, torch.tensor([0, 1, 0]))
    assert not single.multilabel and single.value() == 1.0


def test_thresholds_maximise_f1_or_reach_a_target_precision():
    # label 0: positives score 0.9, 0.8, 0.35; negatives 0.4, 0.1 → best F1 cuts below 0.35 (F1 = 6/7)
    probs = np.array([[0.9], [0.8], [0.35], [0.4], [0.1]])
    y = np.array([[1], [1], [1], [0], [0]])
    (t,), report = tune_thresholds(probs, y, ["a"], "f1")
    assert 0.1 < t < 0.35 and report["a"]["f1"] == pytest.approx(6 / 7)
    (t,), report = tune_thresholds(probs, y, ["a"], "precision:1.0")
    assert 0.4 < t < 0.8 and report["a"]["precision"] == 1.0 and report["a"]["recall"] == pytest.approx(2 / 3)
    (t,), report = tune_thresholds(probs, np.zeros_like(y), ["a"], "f1")
    assert t == 0.5 and "no validation positive" in report["a"]["reason"]


def test_multilabel_metrics_match_hand_counts():
    probs = np.array([[0.9, 0.2, 0.6], [0.1, 0.8, 0.3], [0.7, 0.7, 0.1], [0.2, 0.1, 0.9]])
    y = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 0], [0, 0, 0]])
    m = multilabel_metrics(probs, y, ["a", "b", "c"], [0.5, 0.5, 0.5])
    # predicted: {a,c} {b} {a,b} {c}; exact matches: rows 0 and 1
    assert m["subset_accuracy"] == pytest.approx(0.5)
    # tp a2 b1 c1, fp b1 c1, fn 0 → micro P 4/6, R 1, F1 0.8
    assert m["micro"]["f1"] == pytest.approx(0.8)
    assert m["label_cardinality"] == pytest.approx(1.0) and m["predicted_cardinality"] == pytest.approx(1.5)
    per = {r["label"]: r for r in m["per_label"]}
    assert per["a"]["ap"] == pytest.approx(1.0) and per["b"]["precision"] == pytest.approx(0.5)
    assert per["c"]["ap"] == pytest.approx(0.5)  # its positive ranks second, behind a negative
    assert m["map"] == pytest.approx((1.0 + 1.0 + 0.5) / 3)


# ---- end to end ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    """One multi-label run on the generated shapes, trained from the CLI (the task auto-detected)."""
    root = tmp_path_factory.mktemp("shapes")
    data = make_shapes_csv(root / "data", n=200, split_column=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRANSFERLAB_HOME", str(root / "home"))
        mp.setenv("TRANSFERLAB_OFFLINE", "1")
        r = cli("train", data, "--out", root / "run", *SHAPES_FLAGS)
    assert r.code == 0, r.text
    return root / "run", data, r


def test_cli_training_detects_the_task_and_saves_thresholds(shapes_run):
    run, _, r = shapes_run
    assert "val_map=" in r.out
    meta = json.loads((run / "model.json").read_text())
    assert meta["task"] == "multilabel" and meta["classes"] == sorted(SHAPES)
    assert len(meta["thresholds"]) == 5 and all(0 < t <= 1 for t in meta["thresholds"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == "multilabel" and set(summary["thresholds"]["per_label"]) == set(SHAPES)


def test_evaluate_reaches_map_09_on_the_test_split(shapes_run):
    run, _, _ = shapes_run
    r = cli("evaluate", run, "--split", "test", "--json", "--no-progress")
    assert r.code == 0, r.text
    m = json.loads(r.out)["metrics"]
    assert m["map"] >= 0.9, m["map"]
    assert m["n"] == 40 and {row["label"] for row in m["per_label"]} == set(SHAPES)
    assert 0 <= m["subset_accuracy"] <= 1 and 0 < m["micro"]["f1"] <= 1 and m["label_cardinality"] > 1
    r = cli("evaluate", run, "--split", "test", "--no-progress")
    assert "per label" in r.text and "threshold" in r.text and "map=" in r.out


def test_predict_json_lists_label_sets_above_thresholds(shapes_run):
    run, data, _ = shapes_run
    images = sorted((data.parent / "images").glob("*.png"))[:4]
    r = cli("predict", run, *images, "--json", "--top-k", "5", "--no-progress")
    assert r.code == 0, r.text
    thresholds = dict(zip(sorted(SHAPES), json.loads((run / "model.json").read_text())["thresholds"]))
    for entry in json.loads(r.out):
        ranked = {p["label"]: p["probability"] for p in entry["predictions"]}
        assert len(ranked) == 5
        assert [p["label"] for p in entry["labels"]] == [k for k, v in sorted(ranked.items(), key=lambda kv: -kv[1])
                                                         if v >= thresholds[k]]
    r = cli("predict", run, *images, "--out", data.parent / "preds.csv", "--no-progress")
    with open(data.parent / "preds.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert r.code == 0 and len(rows) == 4
    assert [row["labels"] for row in rows] == [";".join(p["label"] for p in e["labels"]) for e in json.loads(
        cli("predict", run, *images, "--json", "--no-progress").out)]


def test_onnx_export_parity_and_the_same_classifier_from_the_api(shapes_run):
    run, data, _ = shapes_run
    pytest.importorskip("onnxruntime")
    clf = transferlab.load(run)
    assert clf.task == "multilabel" and set(clf.thresholds) == set(SHAPES)
    exported = clf.export()
    assert exported.parity["passed"] and exported.parity["outputs"] == "sigmoid"
    sidecar = json.loads(exported.sidecar.read_text())
    assert sidecar["task"] == "multilabel" and sidecar["thresholds"] == list(clf.thresholds.values())
    onnx = transferlab.load(exported.path)
    image = min((data.parent / "images").glob("*.png"))
    a, b = clf.predict(image, top_k=5), onnx.predict(image, top_k=5)
    assert onnx.task == "multilabel" and a.label_set == b.label_set
    assert [c.probability for c in a.top_k] == pytest.approx([c.probability for c in b.top_k], abs=1e-4)


def test_api_training_with_fine_tuning_stages_selects_on_map(tmp_path):
    """The boundary and full fine-tuning loops score multi-hot targets too (mAP in [0, 1], BCE losses)."""
    data = make_shapes_csv(tmp_path / "data", n=40)
    for finetune in ("boundary", "full"):
        result = transferlab.train(data, out=str(tmp_path / finetune), **{
            **TINY, "epochs_frozen": 2, "epochs_finetune": 1, "finetune": finetune, "finetune_when": "always",
            "task": "multilabel"})
        rows = result.rows
        assert [r["phase"] for r in rows] == ["frozen", "frozen", "finetune"], finetune
        assert all(0 <= r["val_accuracy"] <= 1 and 0 <= r["train_accuracy"] <= 1 for r in rows)
        assert result.summary["task"] == "multilabel" and result.classifier.task == "multilabel"
        p = result.classifier.predict(min((data.parent / "images").glob("*.png")))
        assert p.labels is not None and p.label_set <= set(SHAPES)


def test_multilabel_model_refuses_tta_clearly(shapes_run):
    run, _, _ = shapes_run
    with pytest.raises(TransferlabError, match="multi-label"):
        transferlab.evaluate(run, tta=True, progress=False)


@pytest.mark.parametrize("verb", ["select", "doctor", "lr_find"])
def test_single_label_verbs_refuse_multilabel_data_before_any_work(tmp_path, verb):
    data = make_shapes_csv(tmp_path / "data", n=6)
    with pytest.raises(DataError, match="multi-label"):
        getattr(transferlab, verb)(data, out=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_report_has_a_per_label_section(shapes_run, tmp_path):
    run, _, _ = shapes_run
    html = transferlab.report(run, tmp_path / "report.html", progress=False).read_text()
    assert "Per label" in html and "val mAP" in html and all(name in html for name in SHAPES)
    assert "threshold" in html and "confusion" not in html.lower()
