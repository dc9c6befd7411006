"""Temperature scaling, abstention and conformal sets (issue 22, items 1-2): the maths on synthetic
scores, then one tiny trained run through train, predict, evaluate, export and the Python API."""

from __future__ import annotations

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
])
def test_bad_abstain_options_are_refused_before_any_work(options, message, tmp_path):
    with pytest.raises(TransferlabError, match=message.replace("(", r"\(").replace(")", r"\)")):
        abstain.AbstainOptions(**options)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    result = cli("predict", tmp_path / "no-such-run", "x.png", *flags)  # the model is not even looked at
    assert result.code == 2 and message in result.text


@pytest.fixture
def run(tiny_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    return copy


@pytest.fixture
def images(tiny_run) -> list[Path]:
    return sorted((tiny_run.parent / "data" / "val").rglob("*.png"))  # train_tiny_run's layout


def test_training_fits_the_temperature_on_val_and_keeps_it_in_model_json(tiny_run):
    cal = json.loads((tiny_run / "model.json").read_text())["calibration"]
    assert cal["method"] == "temperature" and cal["fitted_on"] == "val"
    assert cal["temperature"] > 0 and cal["temperature"] != 1.0
    assert cal["val_log_loss"]["after"] <= cal["val_log_loss"]["before"]
    assert len(cal["val_scores"]["confidence"]) == cal["n"] == 12  # make_image_folder: 2 classes × 6 val images
    ev = json.loads((tiny_run / "eval-val.json").read_text())["metrics"]
    assert ev["calibration"]["temperature"] == cal["temperature"]
    assert ev["log_loss"] == pytest.approx(cal["val_log_loss"]["after"], rel=1e-4)
    assert ev["calibration"]["log_loss_before"] == pytest.approx(cal["val_log_loss"]["before"], rel=1e-4)


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
