"""Start-up: the short commands load only what they use (checked in fresh interpreters, never timed), and a
run's model is built once, on the meta device, with the file's tensors (bench/startup.py has the seconds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, train_tiny_run
from torch import nn

import transferlab
from transferlab.evaluation import predict as predict_module
from transferlab.models import heads
from transferlab.models.fold_bn import fold_batchnorm
from transferlab.models.heads import HeadConfig, build_classifier
from transferlab.models.registry import resolve_backbone

# Loaded only by the verbs that need them: training, reports, serving, exporting, explaining.
TRAINING_AND_REPORTS = {"lightning", "pytorch_lightning", "torchmetrics", "sklearn", "matplotlib", "fastapi",
                        "uvicorn", "onnx", "torchcam"}
MODEL_LIBRARIES = {"torch", "torchvision", "timm", "onnxruntime", "safetensors"}

# Prints, on exit (after any SystemExit of the CLI), which of the watched packages the process imported.
_REPORT = ("import atexit, json, sys\n"
           "atexit.register(lambda: print('LOADED=' + json.dumps(sorted(m for m in {watched!r} if m in sys.modules)),"
           " file=sys.stderr))\n")


def loaded(code: str, *args: str, watched: set[str] = TRAINING_AND_REPORTS | MODEL_LIBRARIES) -> set[str]:
    """The watched top-level packages a fresh interpreter running `code` (with `args` as sys.argv[1:]) imported."""
    p = subprocess.run([sys.executable, "-c", _REPORT.format(watched=sorted(watched)) + code, *args],
                       capture_output=True, text=True, env={**os.environ, "TRANSFERLAB_OFFLINE": "1"}, timeout=300,
                       check=False)
    lines = [line for line in p.stderr.splitlines() if line.startswith("LOADED=")]
    assert p.returncode == 0 and lines, f"rc {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return set(json.loads(lines[-1][len("LOADED="):]))


def cli(*argv: str) -> str:
    """`code` for `loaded` that runs the transferlab CLI with `argv`."""
    return f"sys.argv = ['transferlab', *{list(argv)!r}]\nfrom transferlab.cli import main\nmain()\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("startup"), **{**TINY, "strategy": "head-only"})


@pytest.fixture(scope="module")
def onnx_model(run) -> Path:
    return transferlab.export_model(run, "onnx", dynamic_batch=True).path


@pytest.fixture(scope="module")
def image(run) -> str:
    return str(min((run.parent / "data" / "val").rglob("*.png")))


def test_import_transferlab_loads_no_model_library():
    assert loaded("import transferlab") == set()


def test_import_transferlab_defers_its_names_to_first_use():
    assert loaded("import transferlab", watched={"numpy", "PIL", "yaml"}) == set()
    every_name = "import transferlab\nprint([getattr(transferlab, n) for n in transferlab.__all__], transferlab.api)\n"
    assert loaded(every_name) == set()
    assert set(dir(transferlab)) >= set(transferlab.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        transferlab.nope  # noqa: B018


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["-h"], ["predict", "--help"], ["train", "--help"]])
def test_help_and_version_load_no_model_library(argv):
    assert loaded(cli(*argv)) == set()


def test_models_offline_loads_no_training_or_report_library():
    assert not loaded(cli("models", "--offline")) & TRAINING_AND_REPORTS


def test_onnx_load_predict_and_model_never_import_torch(onnx_model, image):
    code = ("import transferlab as t\nc = t.load(sys.argv[1])\n"
            "p = c.predict(sys.argv[2], unknown='auto', sets=0.9)\n"
            "print(p.label, type(c.model).__name__)\n")
    assert loaded(code, str(onnx_model), image) == {"onnxruntime"}


def test_onnx_predict_through_the_cli_never_imports_torch(onnx_model, image):
    used = loaded(cli("predict", str(onnx_model), image, "--unknown", "auto", "--sets", "0.9", "--json"))
    assert used == {"onnxruntime"}


def test_predict_from_a_run_loads_no_training_or_report_library(run, image):
    code = "import transferlab as t\nc = t.load(sys.argv[1])\nprint(c.predict(sys.argv[2]), type(c.model))\n"
    assert not loaded(code, str(run), image) & TRAINING_AND_REPORTS
    assert not loaded(cli("predict", str(run), image)) & TRAINING_AND_REPORTS


def test_a_run_is_built_once_on_the_meta_device_and_predicts_as_a_real_build(run, built_devices):
    model, meta = predict_module.load_run_model(run)
    assert built_devices == ["meta"]  # no second construction, no weight init that the file then overwrites
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])

    reference = build_classifier(*predict_module._architecture(meta, run / "model.json"), load_weights=False)
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference.eval()(x), rtol=0, atol=0)


def test_a_tensor_the_file_lacks_makes_a_real_build(run, monkeypatch):
    """A non-persistent buffer (made at construction, not saved) cannot come from the file: the model is
    then built for real, and keeps the buffer's value."""
    real_build = heads.build_classifier

    def with_buffer(*args, **kwargs):
        model = real_build(*args, **kwargs)
        model.register_buffer("table", torch.arange(3.0), persistent=False)
        return model

    monkeypatch.setattr(heads, "build_classifier", with_buffer)
    model, _ = predict_module.load_run_model(run)
    assert not model.table.is_meta and model.table.tolist() == [0.0, 1.0, 2.0]
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def test_folding_runs_the_original_model_once():
    model = build_classifier(resolve_backbone("test_efficientnet", pretrained=False), 3, HeadConfig()).eval()
    calls = []

    class Counted(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x):
            calls.append(self)
            return self.inner(x)

    wrapped = Counted(model).eval()
    _, n = fold_batchnorm(wrapped, torch.randn(1, 3, 32, 32))
    assert n > 0
    assert sum(c is wrapped for c in calls) == 1  # the pair-finding pass is also the reference output
