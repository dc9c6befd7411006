"""Every train option is checked before a file is read or a backbone loaded (issue 21): a wrong value is
a clear error in a second, not a traceback after the frozen stage, and leaves no run directory behind."""

from __future__ import annotations

import pytest
import torch
from conftest import make_image_folder
from test_cli import cli

from transferlab import _runtime
from transferlab.config import TrainConfig
from transferlab.errors import TransferlabError


@pytest.mark.parametrize("option, message", [
    ({"augment": "heavy"}, "augment 'heavy' is not one of none, light, standard"),
    ({"precision": "fp16"}, "precision 'fp16' is not one of .* \\(for 'fp16' write '16-mixed'\\)"),
    ({"precision": "64-bit"}, "precision '64-bit' is not one of auto, 32-true"),
    ({"device": "tpu"}, "device 'tpu' is not one of auto, cpu, cuda, gpu, mps"),
])
def test_a_wrong_option_value_is_named_with_what_is_valid(option, message):
    with pytest.raises(TransferlabError, match=message):
        TrainConfig(data="x", **option).validate()


@pytest.mark.parametrize("device", ["cuda", "gpu"])
def test_a_gpu_asked_for_on_a_machine_without_one_is_refused_before_any_work(device, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TransferlabError, match=f"device '{device}' asked for, but torch sees no CUDA GPU"):
        TrainConfig(data="x", device=device).validate()
    TrainConfig(data="x", device="cpu").validate()
    TrainConfig(data="x", device="auto").validate()


def test_gpu_is_lightnings_name_for_cuda():
    assert _runtime.resolve_accelerator("gpu") == "cuda" and _runtime.resolve_accelerator("cpu") == "cpu"


def test_the_cli_refuses_a_bad_option_at_once_and_leaves_no_run_behind(tmp_path):
    data = make_image_folder(tmp_path / "data")
    run = tmp_path / "run"
    p = cli("train", data, "--augment", "heavy", "--out", run, "--no-progress")
    assert p.returncode == 2 and "augment 'heavy' is not one of" in p.stderr
    assert "Traceback" not in p.stderr + p.stdout and not run.exists()
    assert "data:" not in p.stderr + p.stdout  # the data were not read


def test_a_backbone_typed_as_its_package_is_named_is_found():
    from transferlab.models.registry import resolve_backbone

    assert resolve_backbone("efficientnet-lite0", pretrained=False).name == "efficientnet_lite0"
    assert resolve_backbone("EfficientNet-Lite0", pretrained=False).name == "efficientnet_lite0"


def test_an_unknown_backbone_suggests_each_name_once_and_the_command_that_lists_them():
    from transferlab.models.registry import BackboneUnavailable, resolve_backbone

    with pytest.raises(BackboneUnavailable) as info:
        resolve_backbone("efficientnet_lit0", pretrained=True)
    message = str(info.value)
    suggested = message.split("Did you mean: ")[1].split("?")[0].split(", ")
    assert "efficientnet_lite0" in suggested and len(suggested) == len(set(suggested))
    assert "`transferlab models`" in message and "backbones`" not in message


def test_the_cli_has_version_and_short_help():
    import transferlab

    p = cli("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"transferlab {transferlab.__version__}"
    p = cli("train", "-h")
    assert p.returncode == 0 and "--epochs-finetune" in p.stdout


def test_options_given_with_resume_are_refused_by_name_not_dropped_silently(tiny_run, tmp_path, caplog):
    """(test_run_extend.py: a larger --epochs-finetune trains a finished run longer.)"""
    import shutil

    from guarantees import cli as in_process

    run = shutil.copytree(tiny_run, tmp_path / "run")
    r = in_process("train", "--resume", run, "--seed", "3", "--no-progress", "--no-report")
    assert r.code == 2 and "Traceback" not in r.text
    assert "--seed cannot be changed on a resumed run" in r.text and "config.yaml" in r.text
    r = in_process("train", "--resume", run, "--no-progress", "--no-report")
    assert r.code == 0 and "nothing to resume" in r.text
