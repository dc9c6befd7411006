"""Temperature scaling, abstention and conformal sets (issue 22, items 1-2): the maths on synthetic
scores, then one tiny trained run through train, predict, evaluate, export and the Python API."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from guarantees import cli

import transferlab
from transferlab.errors import TransferlabError
from transferlab.evaluation import abstain
from transferlab.evaluation.calibration import fit_temperature, scaled_softmax


def _nll(logits: np.ndarray, y: np.ndarray, t: float) -> float:
    return float(-np.log(scaled_softmax(logits, t)[np.arange(len(y)), y]).mean())


def _synthetic(n: int, classes: int, seed: int, sharpness: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax is the true label distribution, times `sharpness` (>1: over-confident)."""
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(0, 2.0, size=(n, classes))
    p = scaled_softmax(true_logits, 1.0)
    y = np.array([rng.choice(classes, p=row) for row in p])
    return true_logits * sharpness, y


@pytest.mark.parametrize("sharpness, direction", [(3.0, 1), (0.4, -1)])
def test_temperature_recovers_the_miscalibration_and_lowers_nll(sharpness, direction):
    logits, y = _synthetic(3000, 5, seed=0, sharpness=sharpness)
    t = fit_temperature(logits, y)
    assert np.sign(np.log(t)) == direction  # softens the over-confident, sharpens the under-confident
    assert t == pytest.approx(sharpness, rel=0.15)  # the logits were the truth times `sharpness`
    assert _nll(logits, y, t) < _nll(logits, y, 1.0) - 0.01
    assert (scaled_softmax(logits, t).argmax(1) == logits.argmax(1)).all()  # accuracy untouched


def test_split_conformal_sets_reach_their_coverage_on_exchangeable_data():
    coverages, sizes = [], []
    for seed in range(5):
        logits, y = _synthetic(4000, 8, seed=seed, sharpness=2.0)  # miscalibrated: the guarantee needs no calibration
        probs = scaled_softmax(logits, 1.0)
        cal, test = slice(0, 1000), slice(1000, None)
        qhat = abstain.conformal_quantile(probs[cal][np.arange(1000), y[cal]], 0.9)
        sets = [abstain.prediction_set(row, qhat) for row in probs[test]]
        coverages.append(np.mean([t in s for s, t in zip(sets, y[test])]))
        sizes.append(np.mean([len(s) for s in sets]))
    assert 0.89 <= np.mean(coverages) <= 0.93  # at least 1 - alpha, and not trivially more
    assert np.mean(sizes) < 8  # not the useless "every label" set
    assert abstain.conformal_quantile([0.5] * 5, 0.9) == 1.0  # n too small for 90 %: every label


def test_the_auto_threshold_reaches_the_target_precision_at_the_largest_coverage():
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.3, 1.0, 2000)
    correct = (rng.uniform(size=2000) < confidence).astype(int)  # calibrated: P(right) = confidence
    threshold, coverage, precision = abstain.precision_threshold(confidence, correct, 0.95)
    answered = confidence >= threshold
    assert precision >= 0.95 and correct[answered].mean() == pytest.approx(precision)
    assert coverage == pytest.approx(answered.mean())
    lower = confidence[confidence < threshold].max()  # one more image answered falls below the target
    assert correct[confidence >= lower].mean() < 0.95
    none = abstain.precision_threshold([0.9, 0.8], [0, 0], 0.5)
    assert none[1] == 0.0 and none[0] > 0.9  # unreachable: abstain on everything


@pytest.mark.parametrize("options, message", [
    ({"unknown": "sometimes"}, "--unknown must be 'auto' or a probability"),
    ({"unknown": "1.5"}, "--unknown must be 'auto' or a probability"),
    ({"target_precision": 1.0}, "--target-precision must be in (0, 1)"),
    ({"sets": 1.0}, "--sets must be a coverage in (0, 1)"),
    ({"sets": "lots"}, "--sets must be a coverage in (0, 1)"),
])
def test_bad_abstain_options_are_refused_before_any_work(options, message, tmp_path):
    with pytest.raises(TransferlabError, match=message.replace("(", r"\(").replace(")", r"\)")):
        abstain.AbstainOptions(**options)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    result = cli("predict", tmp_path / "no-such-run", "x.png", *flags)  # the model is not even looked at
    assert result.code == 2 and (message in result.text or "Invalid value for '--sets'" in result.text)


@pytest.fixture(scope="module")
def noisy_run(tmp_path_factory) -> Path:
    """A tiny head-only run whose val split has two mislabelled images, so the model makes val errors
    to calibrate against (a perfect val split keeps T = 1), with its report."""
    from conftest import TINY, make_image_folder

    root = tmp_path_factory.mktemp("noisy")
    data = make_image_folder(root / "data")
    for name in ("red_0.png", "red_1.png"):
        (data / "val" / "red" / name).rename(data / "val" / "blue" / f"mislabelled_{name}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRANSFERLAB_HOME", str(root / "home"))
        mp.setenv("TRANSFERLAB_OFFLINE", "1")
        return transferlab.train(data, out=str(root / "run"), **{**TINY, "strategy": "head-only",
                                                                 "feature_cache": "memory", "report": True}).run_dir


@pytest.fixture
def run(noisy_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(noisy_run, copy)
    return copy


@pytest.fixture
def images(noisy_run) -> list[Path]:
    return sorted((noisy_run.parent / "data" / "val").rglob("*.png"))


def test_training_fits_the_temperature_on_val_and_keeps_it_in_model_json(noisy_run):
    cal = json.loads((noisy_run / "model.json").read_text())["calibration"]
    assert cal["method"] == "temperature" and cal["fitted_on"] == "val"
    assert cal["temperature"] > 0 and cal["temperature"] != 1.0
    assert cal["val_log_loss"]["after"] < cal["val_log_loss"]["before"]
    assert len(cal["val_scores"]["confidence"]) == cal["n"] == 12  # make_image_folder: 2 classes × 6 val images
    assert sum(cal["val_scores"]["correct"]) <= 10  # the two mislabelled images
    ev = json.loads((noisy_run / "eval-val.json").read_text())["metrics"]
    assert ev["calibration"]["temperature"] == cal["temperature"]
    assert ev["log_loss"] == pytest.approx(cal["val_log_loss"]["after"], rel=1e-4)
    assert ev["calibration"]["log_loss_before"] == pytest.approx(cal["val_log_loss"]["before"], rel=1e-4)
    html = (noisy_run / "report.html").read_text()
    assert f"Calibration: temperature T = {cal['temperature']:.4f}" in html
    assert "Reliability before temperature scaling" in html and "Risk–coverage" in html


def test_a_val_split_without_errors_keeps_t_1_and_says_why(tiny_run):
    cal = json.loads((tiny_run / "model.json").read_text())["calibration"]
    assert cal["method"] == "none" and cal["temperature"] == 1.0 and "misclassified" in cal["note"]
    assert len(cal["val_scores"]["correct"]) == 12  # abstain and sets still have their val scores


def _edit_calibration(run: Path, temperature: float | None, threshold: float | None = None) -> None:
    """Edit model.json: a temperature (None: no calibration entry, as before this feature) and, with
    `threshold`, val scores whose 0.99-precision threshold is exactly it."""
    meta = json.loads((run / "model.json").read_text())
    if temperature is None:
        meta.pop("calibration", None)
    else:
        meta["calibration"]["temperature"] = temperature
        if threshold is not None:
            confidence = [threshold - 0.001, threshold, 1.0, 1.0]
            meta["calibration"]["val_scores"] = {"confidence": confidence, "correct": [0, 1, 1, 1],
                                                 "true_probability": confidence}
    (run / "model.json").write_text(json.dumps(meta))


def _top(run: Path, images: list[Path]) -> np.ndarray:
    from PIL import Image

    return transferlab.load(run).probabilities([Image.open(p).convert("RGB") for p in images]).max(axis=1)


def test_predict_unknown_auto_abstains_on_low_confidence_inputs_with_candidates(run, images):
    _edit_calibration(run, 1.0)
    top = np.unique(np.round(_top(run, images), 6))
    assert len(top) > 1, "the tiny model must give differing confidences"
    middle = len(top) // 2
    _edit_calibration(run, 1.0, threshold=float(top[middle - 1] + top[middle]) / 2)
    result = cli("predict", run, *images, "--unknown", "auto", "--json", "--no-progress")
    assert result.code == 0, result.text
    entries = json.loads(result.out)
    threshold = transferlab.load(run).abstainer("auto").threshold
    assert any(e["abstained"] for e in entries) and not all(e["abstained"] for e in entries)
    for e in entries:
        assert set(e) == {"path", "predictions", "label", "abstained"}  # the documented shape
        below = e["predictions"][0]["probability"] < threshold
        assert e["abstained"] == below and e["label"] == ("unknown" if below else e["predictions"][0]["label"])
        assert len(e["predictions"]) == 2  # the candidates stay
    assert "answered" in result.text  # the val coverage of the threshold is reported
    out = run / "preds.csv"
    assert cli("predict", run, *images, "--unknown", "auto", "--sets", "0.5", "--out", out, "--no-progress").code == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["label"] for r in rows] == [e["label"] for e in entries]
    assert all(r["abstained"] in ("True", "False") and r["set"].split("|")[0] == r["label_1"] for r in rows)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exports_carry_the_temperature_in_the_graph_and_pass_parity(run, images, fmt):
    from PIL import Image

    from transferlab.export.exporter import FORMATS
    from transferlab.export.preprocess import preprocess_image

    _edit_calibration(run, 4.0)  # far from 1, so a graph without it would fail parity and the checks below
    result = transferlab.export_model(run, fmt)
    assert result.parity["passed"] and result.metadata["output"]["temperature"] == 4.0
    assert result.metadata["calibration"]["temperature"] == 4.0
    pics = [Image.open(p).convert("RGB") for p in images[:4]]
    torch_probs = transferlab.load(run).probabilities(pics)
    x = np.stack([preprocess_image(im, result.metadata["preprocessing"]) for im in pics])
    logits = FORMATS[fmt].load(result.path)(x)
    np.testing.assert_allclose(scaled_softmax(logits, 1.0), torch_probs, atol=1e-4)  # calibrated in the graph
    assert not np.allclose(scaled_softmax(logits * 4.0, 1.0), torch_probs, atol=1e-3)  # and T was not 1 there
    if fmt == "onnx":  # the sidecar carries the val scores: abstain and sets work on onnxruntime alone
        clf = transferlab.load(result.path)
        np.testing.assert_allclose(clf.probabilities(pics), torch_probs, atol=1e-4)
        onnx_preds = clf.predict(images[:4], unknown="auto", sets=0.5)
        torch_preds = transferlab.load(run).predict(images[:4], unknown="auto", sets=0.5)
        assert [(p.label, p.abstained, p.set) for p in onnx_preds] == [(p.label, p.abstained, p.set) for p in torch_preds]
        assert all(p.set and p.set[0] == p.candidates[0].label for p in onnx_preds)


def test_a_run_without_calibration_still_loads_and_predicts_with_t_1_and_can_be_calibrated(run, images):
    from PIL import Image

    _edit_calibration(run, None)  # model.json as written before calibration existed
    clf = transferlab.load(run)
    assert clf.temperature == 1.0 and clf.calibration is None
    pic = [Image.open(images[0]).convert("RGB")]
    import torch

    with torch.inference_mode():
        raw = clf.model(torch.stack([clf.transform(pic[0])])).double().softmax(1).numpy()
    np.testing.assert_allclose(clf.probabilities(pic), raw, atol=1e-5)
    assert clf.predict(images[0]).label in clf.classes
    with pytest.raises(TransferlabError, match="evaluate RUN --calibrate"):
        clf.predict(images[0], unknown="auto")
    assert clf.predict(images[0], unknown=1.0).label == "unknown"  # a given threshold needs no val scores
    result = cli("evaluate", run, "--calibrate", "--no-progress")  # calibrate an existing run, no retraining
    assert result.code == 0, result.text
    assert "temperature T =" in result.text and "--unknown auto" in result.text
    cal = json.loads((run / "model.json").read_text())["calibration"]
    assert cal["temperature"] != 1.0 and transferlab.load(run).predict(images[0], unknown="auto").abstained is not None
    refused = cli("evaluate", run, "--split", "test", "--calibrate", "--no-progress")
    assert refused.code == 2 and "run's own val split" in refused.text


def test_evaluate_no_calibrate_resets_t_to_1_and_keeps_the_val_scores(run):
    result = cli("evaluate", run, "--no-calibrate", "--no-progress", "--json")
    assert result.code == 0, result.text
    cal = json.loads((run / "model.json").read_text())["calibration"]
    assert cal["method"] == "none" and cal["temperature"] == 1.0 and "note" not in cal
    assert len(cal["val_scores"]["correct"]) == 12
    assert json.loads(result.out)["metrics"]["calibration"]["temperature"] == 1.0
