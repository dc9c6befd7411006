"""Untrusted files: nothing is ever unpickled, and the feature cache is checked before it is used.

The attack: a PyTorch checkpoint is a pickle, and unpickling runs whatever callable its author put in
it. Each crafted file below would create a marker file if anything unpickled it.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from guarantees import cli, disk_feature_cache
from safetensors.torch import save_file

import transferlab
from transferlab.models.registry import create_backbone, resolve_backbone
from transferlab.training import feature_cache
from transferlab.training.checkpoint import tensors_path

SRC = Path(transferlab.__file__).parent


class _Payload:
    """Unpickling this calls open(marker, "w"): the marker's existence proves code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def pickle_checkpoint(path: Path, marker: Path, kind: str) -> Path:
    payload = {"state_dict": {"w": torch.zeros(2)}, "hook": _Payload(marker)}
    if kind == "torch.save zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    assert not marker.exists()
    return path


@pytest.fixture
def trained(tiny_run):
    return tiny_run.parent / "data", tiny_run


KINDS = ["torch.save zip", "raw pickle"]


@pytest.mark.parametrize("kind", KINDS)
def test_pickle_in_place_of_the_model_weights_is_refused_by_predict(trained, tmp_path, kind):
    data, reference = trained
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    marker = tmp_path / "pwned"
    pickle_checkpoint(run / "model.safetensors", marker, kind)
    r = cli("predict", run, data / "val" / "red" / "red_0.png")
    assert r.code == 2 and "Traceback" not in r.text
    assert f"Refusing to load {run / 'model.safetensors'}: it is a pickle-based PyTorch checkpoint" in r.text
    assert "Unpickling a file can run arbitrary code" in r.text
    assert not marker.exists()


@pytest.mark.parametrize("name", ["model.pt", "weights.pth", "last.ckpt"])
def test_pickle_checkpoint_given_as_the_model_file_is_refused(trained, tmp_path, name):
    data, reference = trained
    marker = tmp_path / "pwned"
    path = pickle_checkpoint(tmp_path / name, marker, "torch.save zip")
    shutil.copy(reference / "model.json", path.with_suffix(".json"))
    r = cli("predict", path, data / "val" / "red" / "red_0.png")
    assert r.code == 2 and "Refusing to load" in r.text and "pickle-based" in r.text
    assert not marker.exists()


def test_pickle_in_place_of_a_resume_checkpoint_is_refused(trained, tmp_path):
    _data, reference = trained
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    state = json.loads((run / "state.json").read_text())
    (run / "state.json").write_text(json.dumps(state | {"status": "running", "finetune_epochs_done": 1}))
    marker = tmp_path / "pwned"
    pickle_checkpoint(tensors_path(run / "checkpoints" / "last"), marker, "torch.save zip")
    r = cli("train", "--resume", run)
    assert r.code == 2 and "Refusing to load" in r.text
    assert not marker.exists()


def test_tampered_backbone_weights_in_the_torch_hub_cache_are_refused(tmp_path, monkeypatch):
    """torchvision's own download path calls torch.load(weights_only=False); ours forces weights-only."""
    from torchvision.models import ResNet18_Weights

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    marker = tmp_path / "pwned"
    pickle_checkpoint(tmp_path / "hub" / "checkpoints" / Path(ResNet18_Weights.DEFAULT.url).name, marker,
                      "torch.save zip")
    spec = resolve_backbone("tv:resnet18")  # offline: served from the (tampered) cache
    with pytest.raises(transferlab.TransferlabError, match="Refusing the weights of backbone 'tv:resnet18'"):
        create_backbone(spec)
    assert not marker.exists()


def test_every_torch_load_in_the_code_is_weights_only():
    """The rule, checked on the source: no pickle loading, every torch.load weights-only."""
    offenders = []
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in call[1]:
                offenders.append(f"{path.name}: {call[0]}")
        offenders += [f"{path.name}: {m[0]}" for m in re.finditer(r"pickle\.loads?\(|import dill|joblib\.load", text)]
    assert offenders == []
    assert any("torch.load(" in p.read_text() for p in SRC.rglob("*.py"))  # the scan does see the one call


# --- feature cache: validated (key, shape, dtype) before use, rebuilt when stale or corrupt


def _corrupt(path: Path, how: str, marker: Path) -> None:
    good = feature_cache.load_tensors(path)
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "garbage":
        path.write_bytes(b"\x00garbage" * 10)
    elif how == "pickle":
        pickle_checkpoint(path, marker, "torch.save zip")
    elif how == "wrong key":
        save_file({"features": good["features"], "key": torch.zeros_like(good["key"])}, str(path))
    elif how == "wrong shape":
        save_file({"features": good["features"][:-1].contiguous(), "key": good["key"]}, str(path))
    elif how == "wrong dtype":
        save_file({"features": good["features"].half(), "key": good["key"]}, str(path))
    elif how == "missing tensor":
        save_file({"key": good["key"]}, str(path))


@pytest.mark.parametrize("how", ["truncated", "garbage", "pickle", "wrong key", "wrong shape", "wrong dtype",
                                 "missing tensor"])
def test_bad_feature_cache_file_is_rebuilt_not_trusted(tmp_path, caplog, how):
    path, fresh, features = disk_feature_cache(tmp_path)
    marker = tmp_path / "pwned"
    _corrupt(path, how, marker)
    with caplog.at_level(logging.WARNING, logger="transferlab"):
        rebuilt, hit = features()
    assert not hit and torch.equal(rebuilt, fresh)
    assert re.search(rf"feature cache {path.name} is (stale|corrupt).*rebuilding", caplog.text)
    assert not marker.exists()
    again, hit = features()  # the rebuilt file is valid again
    assert hit and torch.equal(again, fresh)
