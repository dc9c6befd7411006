"""Shipping a model: export with proven parity (ONNX, TorchScript, fp16, dynamic batch), the torch-free
preprocessing it relies on, ONNX prediction with torch unavailable, streamed batch prediction, bench-infer."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, train_tiny_run
from PIL import Image

import transferlab
from transferlab.data.transforms import Preprocessing, eval_transform
from transferlab.errors import TransferlabError
from transferlab.evaluation.predict import load_run_model
from transferlab.export import exporter
from transferlab.export.batch import iter_predictions
from transferlab.export.parity import ParityError, parity_images
from transferlab.export.predictors import load_predictor
from transferlab.export.preprocess import preprocess_image
from transferlab.export.sidecar import read_sidecar, sidecar_path

FAST = {**TINY, "strategy": "head-only", "feature_cache": "memory"}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """One tiny trained run (random-init timm test model, 32 px, two colour classes)."""
    return train_tiny_run(tmp_path_factory.mktemp("export"), **FAST)


@pytest.fixture(scope="module")
def onnx_model(run) -> Path:
    return transferlab.export_model(run, "onnx", dynamic_batch=True).path


def images_in(run: Path) -> list[Path]:
    return sorted((Path(run).parent / "data" / "val").rglob("*.png"))


def torch_probabilities(run: Path, paths: list[Path]) -> np.ndarray:
    """What the trained PyTorch model says, calibrated by model.json's temperature (which exports apply
    in the graph), computed here independently of the export code."""
    model, meta = load_run_model(run)
    transform = eval_transform(Preprocessing.from_dict(meta["preprocessing"]))
    temperature = meta["calibration"]["temperature"]
    with torch.no_grad():
        logits = model(torch.stack([transform(Image.open(p).convert("RGB")) for p in paths]))
        return (logits / temperature).softmax(1).numpy()


# --- preprocessing without torch -----------------------------------------------------------------------------


@pytest.mark.parametrize("pre", [
    Preprocessing(),
    Preprocessing(input_size=32, crop_pct=0.95),
    Preprocessing(input_size=96, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=1.0),
    Preprocessing(input_size=40, crop_mode="squash", interpolation="bilinear"),
    Preprocessing(input_size=33, interpolation="nearest", crop_pct=0.6),
], ids=["imagenet-224", "tiny-32", "lite-96", "squash-bilinear", "odd-nearest"])
def test_numpy_preprocessing_equals_the_torch_eval_transform(pre):
    rng = np.random.default_rng(0)
    transform = eval_transform(pre)
    for h, w in [(40, 40), (17, 300), (300, 17), (224, 224), (231, 250), (1, 1), (5, 3)]:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        expected = transform(image).numpy()
        got = preprocess_image(image, pre.to_dict())
        assert got.shape == expected.shape == (3, pre.input_size, pre.input_size)
        np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)


# --- export and parity ---------------------------------------------------------------------------------------


def run_exported(path: Path, x: np.ndarray) -> np.ndarray:
    """Logits from an exported file, loaded here with the plain runtime APIs (not transferlab's)."""
    if path.suffix == ".onnx":
        import onnxruntime as ort

        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        return torch.jit.load(str(path)).eval()(torch.from_numpy(x)).numpy()


def test_an_export_takes_any_batch_unless_a_fixed_one_is_asked_for(run, tmp_path):
    assert read_sidecar(transferlab.export_model(run, out=tmp_path / "a.onnx").path)["input"]["shape"][0] is None
    env = {**os.environ, "TRANSFERLAB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "transferlab", "export", str(run), "--fixed-batch", "-o",
                        str(tmp_path / "b.onnx")], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert p.returncode == 0, p.stderr
    assert read_sidecar(tmp_path / "b.onnx")["input"]["shape"][0] == 1


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("dynamic", [False, True], ids=["batch1", "dynamic"])
def test_export_proves_parity_on_validation_images_and_writes_a_complete_sidecar(run, tmp_path, fmt, dynamic):
    out = tmp_path / f"m{exporter.FORMATS[fmt].extension}"
    result = transferlab.export_model(run, fmt, out=out, dynamic_batch=dynamic)
    assert result.path == out and out.is_file() and result.sidecar == sidecar_path(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, f"{out.name}.json"])  # no temp left

    meta = read_sidecar(out)
    model_meta = json.loads((run / "model.json").read_text())
    assert meta["runtime"] == fmt and meta["precision"] == "fp32" and meta["dynamic_batch"] is dynamic
    assert meta["classes"] == model_meta["classes"] == ["blue", "red"]
    assert meta["preprocessing"] == model_meta["preprocessing"]
    assert meta["input"]["shape"] == [None if dynamic else 1, 3, 32, 32]
    assert ("opset" in meta) is (fmt == "onnx")
    parity = meta["parity"]
    assert parity["passed"] and parity["max_abs_diff"] <= 1e-4 and parity["tolerance"] == 1e-4
    assert parity["top1_identical"] == parity["images"] == 8
    assert parity["source"] == "8 images from the run's validation split"
    assert parity["batch_sizes"] == ([1, 8] if dynamic else [1])

    # Checked again here, with the plain runtime APIs and the torchvision transform.
    paths = images_in(run)
    expected = torch_probabilities(run, paths)
    inputs = np.stack([preprocess_image(Image.open(p).convert("RGB"), meta["preprocessing"]) for p in paths])
    if dynamic:
        got = torch.from_numpy(run_exported(out, inputs)).softmax(1).numpy()
    else:
        got = np.concatenate([torch.from_numpy(run_exported(out, x[None])).softmax(1).numpy() for x in inputs])
    assert np.abs(got - expected).max() <= 1e-4
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_static_onnx_graph_has_batch_one_and_dynamic_graph_a_symbolic_batch(run, onnx_model, tmp_path):
    import onnx

    static = transferlab.export_model(run, "onnx", out=tmp_path / "static.onnx", dynamic_batch=False).path

    def batch_dim(path):
        return onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]

    assert batch_dim(static).dim_value == 1
    assert batch_dim(onnx_model).dim_param == "batch"
    assert onnx_model == run / "export" / "model.onnx"  # the default location


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_fp16_export_halves_the_file_within_its_documented_tolerance(run, tmp_path, fmt):
    ext = exporter.FORMATS[fmt].extension
    fp16 = transferlab.export_model(run, fmt, out=tmp_path / f"half{ext}", fp16=True, dynamic_batch=True,
                                    parity_images=4)
    meta = read_sidecar(fp16.path)
    assert meta["precision"] == "fp16" and meta["input"]["dtype"] == "float32"  # fp32 in and out
    assert meta["parity"]["passed"] and meta["parity"]["tolerance"] == 1e-2 and meta["parity"]["batch_sizes"] == [1, 4]
    assert 0 < meta["parity"]["max_abs_diff"] <= 1e-2  # half precision really computed: not bit-identical
    assert fp16.path.stat().st_size < 0.6 * (run / "model.safetensors").stat().st_size  # fp32 weights


def test_a_parity_failure_is_a_clear_error_and_leaves_no_file(run, tmp_path, monkeypatch):
    real = exporter.FORMATS["onnx"]

    def skewed_loader(path, threads=None):
        runner = real.load(path, threads)
        return lambda x: runner(x) + np.array([0.5, 0.0], dtype=np.float32)  # an exporter bug, simulated

    monkeypatch.setitem(exporter.FORMATS, "onnx", exporter.ExportFormat(real.extension, real.export, skewed_loader))
    out = tmp_path / "bad.onnx"
    with pytest.raises(ParityError, match=r"does not reproduce the PyTorch model: max \|Δ probability\|"):
        transferlab.export_model(run, "onnx", out=out)
    assert list(tmp_path.iterdir()) == []


def test_parity_falls_back_to_generated_images_when_the_training_data_is_gone(run, tmp_path):
    moved = tmp_path / "run"
    shutil.copytree(run, moved)
    config = moved / "config.yaml"
    config.write_text(config.read_text().replace(f"data: {run.parent / 'data'}", f"data: {tmp_path / 'gone'}"))
    images, source = parity_images(moved, ["blue", "red"], n=5)
    assert len(images) == 5 and source.startswith("5 generated images")
    assert len({im.size for im in images}) == 5  # assorted shapes exercise resize and crop
    result = transferlab.export_model(moved, "onnx", out=tmp_path / "m.onnx", parity_images=5)
    assert result.parity["passed"] and result.parity["source"].startswith("5 generated images")


def test_export_refuses_a_file_name_of_another_format(run, tmp_path):
    with pytest.raises(TransferlabError, match="'.pt' file"):
        transferlab.export_model(run, "torchscript", out=tmp_path / "model.onnx")
    with pytest.raises(TransferlabError, match="Unknown export format"):
        transferlab.export_model(run, "tflite")


def test_export_command_prints_the_parity_result(run, tmp_path):
    from typer.testing import CliRunner

    from transferlab.cli import app

    out = tmp_path / "cli.onnx"
    result = CliRunner().invoke(app, ["export", str(run), "--dynamic-batch", "-o", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert f"export={out}" in result.output and "top1_identical=8/8" in result.output
    assert "parity vs PyTorch: max |Δ probability|" in result.output and "batch 1, 8" in result.output
    assert out.is_file() and sidecar_path(out).is_file()


# --- prediction through ONNX, without torch ------------------------------------------------------------------


@pytest.fixture
def mixed_inputs(run, tmp_path) -> list[str]:
    """Real images, a truncated PNG, text saved as .png, and a missing path."""
    val = run.parent / "data" / "val"
    bad = tmp_path / "bad"
    bad.mkdir()
    good = (val / "red" / "red_0.png").read_bytes()
    (bad / "truncated.png").write_bytes(good[: len(good) // 2])
    (bad / "text.png").write_text("not an image")
    return [str(val / "blue"), str(bad), str(val / "red" / "red_1.png"), str(tmp_path / "missing.png")]


def test_onnx_predict_runs_with_torch_unavailable_and_matches_the_run(run, onnx_model, mixed_inputs, tmp_path):
    # `import torch` raises in this interpreter: nothing on the ONNX path may need it.
    code = ("import sys; sys.modules['torch'] = None; sys.argv = ['transferlab'] + sys.argv[1:]\n"
            "from transferlab.cli import main; main()")
    env = {**os.environ, "TRANSFERLAB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-c", code, "predict", str(onnx_model), *mixed_inputs, "--json",
                        "--batch-size", "4"], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert p.returncode == 1, p.stderr  # 1: some inputs failed (mixed_inputs holds three bad ones)
    from_onnx = json.loads(p.stdout)
    from_run = transferlab.predict(run, mixed_inputs, batch_size=4)
    assert [r["path"] for r in from_onnx] == [r["path"] for r in from_run]
    assert len(from_run) == 6 + 2 + 1 + 1
    for a, b in zip(from_onnx, from_run):
        assert a.get("error") == b.get("error")
        if "predictions" in b:
            assert [x["label"] for x in a["predictions"]] == [x["label"] for x in b["predictions"]]
            assert np.allclose([x["probability"] for x in a["predictions"]],
                               [x["probability"] for x in b["predictions"]], atol=2e-6)
    errors = {Path(r["path"]).name: r["error"] for r in from_run if "error" in r}
    assert errors["truncated.png"].startswith("truncated or corrupt image")
    assert errors["text.png"].startswith("not an image")
    assert errors["missing.png"] == "no such file or directory"


def test_onnx_predict_in_process_never_builds_a_torch_model(onnx_model, mixed_inputs, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a torch model was built for an ONNX prediction")

    monkeypatch.setattr("transferlab.evaluation.predict.load_run_model", forbidden)
    monkeypatch.setattr("transferlab.models.heads.build_classifier", forbidden)
    results = transferlab.predict(onnx_model, mixed_inputs, top_k=5)
    scored = [r for r in results if "predictions" in r]
    assert len(scored) == 7 and all(len(r["predictions"]) == 2 for r in scored)  # top-5 capped at 2 classes
    assert all(abs(sum(p["probability"] for p in r["predictions"]) - 1) < 1e-5 for r in scored)


def test_predict_streams_to_csv_and_json_through_the_cli(onnx_model, mixed_inputs, tmp_path):
    env = {**os.environ, "TRANSFERLAB_OFFLINE": "1", "COLUMNS": "200"}
    for out in (tmp_path / "preds.csv", tmp_path / "deep" / "preds.json"):
        p = subprocess.run([sys.executable, "-m", "transferlab", "predict", str(onnx_model), *mixed_inputs,
                            "--top-k", "2", "--out", str(out)], capture_output=True, text=True, env=env, timeout=300,
                           check=False)
        assert p.returncode == 1, p.stderr  # some inputs failed
        assert f"predictions=7 failed=3 out={out}" in p.stdout
        assert "failed" in p.stderr and "truncated.png" in p.stderr
        assert not list(out.parent.glob(".*partial"))
    with open(tmp_path / "preds.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "label_1", "probability_1", "label_2", "probability_2", "error"]
    assert len(rows) == 10 and sum(bool(r["error"]) for r in rows) == 3
    as_json = json.loads((tmp_path / "deep" / "preds.json").read_text())
    assert [r["path"] for r in as_json] == [r["path"] for r in rows]
    assert {r["label_1"] for r in rows if not r["error"]} <= {"blue", "red"}


class CountingPredictor:
    """Stands in for a model: counts prepared images alive (prepared, not yet scored)."""

    runtime, name, classes, input_size = "fake", "fake", ["a", "b", "c"], 4

    def __init__(self) -> None:
        self.alive = self.most_alive = self.batches = 0
        self.lock = threading.Lock()  # prepare runs on the decode threads

    def prepare(self, image):
        with self.lock:
            self.alive += 1
            self.most_alive = max(self.most_alive, self.alive)
        return np.asarray(image, dtype=np.float32).mean(axis=(0, 1))

    def probabilities(self, batch):
        with self.lock:
            self.alive -= len(batch)
        self.batches += 1
        return np.stack([x / x.sum() for x in batch])


def test_batch_prediction_streams_in_constant_memory_and_keeps_input_order(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(150):
        paths.append(tmp_path / f"{i:03d}.png")
        Image.fromarray(rng.integers(1, 255, (6, 6, 3), dtype=np.uint8)).save(paths[-1])
    (tmp_path / "050.png").write_bytes(b"broken")
    consumed = []

    def lazily():
        for p in paths:
            consumed.append(p)
            yield str(p)

    predictor = CountingPredictor()
    stream = iter_predictions(predictor, lazily(), top_k=2, batch_size=8)
    first = next(stream)
    assert first["path"] == str(paths[0]) and len(consumed) < 40  # results come before the input is exhausted
    results = [first, *stream]
    assert [r["path"] for r in results] == [str(p) for p in paths]
    assert results[50]["error"].startswith("not an image") and all("predictions" in r for r in results[51:])
    assert predictor.most_alive <= 2 * 8 + 4  # a batch plus the decode-ahead window, however many inputs
    assert predictor.batches == 19  # 149 good images in batches of 8


def test_predict_rejects_a_model_file_it_cannot_use(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"x")
    with pytest.raises(TransferlabError, match="exported .onnx"):
        load_predictor(tmp_path / "model.pt")
    (tmp_path / "lonely.onnx").write_bytes(b"x")
    with pytest.raises(TransferlabError, match="no metadata file lonely.onnx.json"):
        load_predictor(tmp_path / "lonely.onnx")


# --- bench-infer ---------------------------------------------------------------------------------------------


def test_bench_infer_measures_every_runtime_and_batch_size(run):
    result = transferlab.bench_infer(run, batch_sizes=(1, 3), seconds=0.02, min_runs=2)
    rows = result["rows"]
    assert [(r["runtime"], r["batch_size"]) for r in rows] == [
        (rt, b) for rt in ("pytorch", "torchscript", "onnxruntime") for b in (1, 3)]
    for r in rows:
        assert r["runs"] >= 2 and 0 < r["p50_ms"] <= r["p95_ms"] and r["images_per_second"] > 0
        assert r["cpu_ms_per_image"] >= 0
    env = result["environment"]
    assert env["model"] == "test_efficientnet" and env["input_size"] == 32 and env["threads"] >= 1
    with pytest.raises(TransferlabError, match="Unknown runtime"):
        transferlab.bench_infer(run, runtimes=["tensorrt"])
