"""`transferlab.load(...)`: a trained model as one object, from a run directory or an exported .onnx."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import transferlab
from transferlab.classifier import Candidate, Classifier, Prediction
from transferlab.errors import TransferlabError
from transferlab.training.run import TrainResult


def _val_images(run: Path) -> list[Path]:
    return sorted((run.parent / "data" / "val").rglob("*.png"))


@pytest.fixture(scope="module")
def clf(tiny_run) -> Classifier:
    return transferlab.load(tiny_run)


def test_load_gives_a_classifier_with_its_classes_transform_and_torch_module(clf, tiny_run):
    meta = json.loads((tiny_run / "model.json").read_text())
    assert isinstance(clf, Classifier) and clf.runtime == "pytorch" and clf.classes == meta["classes"]
    assert isinstance(clf.model, torch.nn.Module) and not clf.model.training
    image = Image.open(_val_images(tiny_run)[0]).convert("RGB")
    x = clf.transform(image)
    assert tuple(x.shape) == (3, clf.input_size, clf.input_size)
    with torch.inference_mode():
        probs = (clf.model(x[None]) / clf.temperature).softmax(1)[0].numpy()  # model: raw logits
    np.testing.assert_allclose(probs, clf.probabilities([image])[0], atol=1e-5)
    assert "runtime='pytorch'" in repr(clf)


def test_one_input_gives_one_typed_prediction_that_matches_transferlab_predict(clf, tiny_run):
    path = _val_images(tiny_run)[0]
    p = clf.predict(path, top_k=2)
    assert isinstance(p, Prediction) and p.ok and p.source == str(path)
    assert p.label == p.top_k[0].label and p.probability == p.top_k[0].probability
    assert [c.label for c in p.top_k] == sorted(clf.classes, key=lambda c: -dict(
        (x.label, x.probability) for x in p.top_k)[c])
    assert all(isinstance(c, Candidate) for c in p.top_k) and p.top_k[0].probability >= p.top_k[1].probability
    assert p.to_dict() == transferlab.predict(tiny_run, [path], top_k=2)[0]
    assert clf.predict(str(path), top_k=2) == p  # str or Path


def test_in_memory_images_are_predicted_as_their_files(clf, tiny_run):
    path = _val_images(tiny_run)[0]  # PNG: lossless, so the array is the file's pixels
    from_file = clf.predict(path)
    pil = Image.open(path)
    rgba = pil.convert("RGBA")  # opaque alpha: composited on white, the same pixels
    for image in (pil, np.asarray(pil.convert("RGB")), rgba):
        p = clf.predict(image)
        assert p.source is None and p.label == from_file.label
        assert p.probability == pytest.approx(from_file.probability, abs=1e-5)


def test_many_inputs_keep_their_order_and_a_bad_one_does_not_stop_the_others(clf, tiny_run, tmp_path):
    images = _val_images(tiny_run)
    folder = images[0].parent
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    inputs = [images[0], Image.open(images[1]), tmp_path / "missing.jpg", broken, folder, np.asarray(
        Image.open(images[2]).convert("RGB"))]
    out = clf.predict(inputs)
    in_folder = sorted(folder.glob("*.png"))
    assert isinstance(out, list) and len(out) == 5 + len(in_folder)
    assert out[0].source == str(images[0]) and out[1].source is None and out[1].ok
    assert out[2].error == "no such file or directory" and out[2].label is None and out[2].top_k == ()
    assert not out[3].ok and out[3].source == str(broken)
    assert [p.source for p in out[4:-1]] == [str(f) for f in in_folder] and out[-1].source is None
    assert clf.predict(tmp_path / "missing.jpg").error == "no such file or directory"  # one input, one Prediction
    assert isinstance(clf.predict(str(folder)), list)  # a folder is many


def test_what_cannot_be_predicted_is_a_clear_error(clf, tmp_path):
    with pytest.raises(TransferlabError, match="uint8"):
        clf.predict(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(TransferlabError, match="cannot predict a dict"):
        clf.predict([{"image": 1}])
    with pytest.raises(TransferlabError, match="top_k"):
        clf.predict(np.zeros((8, 8, 3), np.uint8), top_k=0)
    with pytest.raises(TransferlabError, match="does not exist"):
        transferlab.load(tmp_path / "nowhere")


def test_a_training_result_hands_back_its_classifier(tiny_run):
    result = TrainResult(run_dir=tiny_run, summary={})
    assert isinstance(result.classifier, Classifier) and result.classifier is result.classifier
    path = _val_images(tiny_run)[0]
    assert result.predict([path]) == transferlab.predict(tiny_run, [path])


def test_an_onnx_export_loads_as_the_same_object_without_torch(tiny_run, tmp_path):
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    shutil.copytree(tiny_run.parent / "data", tmp_path / "data")
    onnx = transferlab.load(run).export("onnx", dynamic_batch=True).path
    clf = transferlab.load(onnx)
    assert clf.runtime == "onnxruntime" and clf.classes == transferlab.load(run).classes
    images = _val_images(run)
    np.testing.assert_allclose(clf.probabilities([Image.open(p).convert("RGB") for p in images]),
                               transferlab.load(run).probabilities([Image.open(p).convert("RGB") for p in images]),
                               atol=1e-4)
    assert type(clf.model).__name__ == "InferenceSession"  # the object onnxruntime runs, not a torch module
    with pytest.raises(TransferlabError, match="needs the run directory"):
        clf.evaluate()
    code = ("import sys, transferlab; c = transferlab.load(sys.argv[1]); p = c.predict(sys.argv[2]); "
            "print(p.label, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(onnx), str(images[0])], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == [clf.predict(images[0]).label, "False"]
