"""Hostile inputs, flaky disks and slow clients (issue 20): each case a second round of attacks found,
held to its fix. Loopback only; tiny generated models and images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from guarantees import cli

from transferlab.models.heads import HeadConfig, build_classifier
from transferlab.models.registry import resolve_backbone

# --- TorchScript export of the default backbone (timm's TF-'SAME' convolutions) -----------------------


def _untrained_run(root: Path, backbone: str, img_size: int) -> Path:
    """A run directory as `train` writes it, for `backbone` at random init: the export bug is in the
    architecture (its 'SAME'-padded convolutions), not in the weights."""
    from transferlab.training.run import model_metadata, save_model

    spec = resolve_backbone(backbone, pretrained=False, img_size=img_size)
    torch.manual_seed(0)
    head = HeadConfig()
    model = build_classifier(spec, 3, head, load_weights=False).eval()
    root.mkdir(parents=True)
    save_model(root, model, model_metadata(spec, head, ["a", "b", "c"], {}))
    return root


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_torchscript_export_of_each_offline_lite_passes_its_parity_check(tmp_path, backbone):
    run = _untrained_run(tmp_path / "run", backbone, img_size=33)  # odd: the asymmetric TF padding is used
    r = cli("export", run, "--format", "torchscript", "--dynamic-batch", "--parity-images", "2")
    assert r.code == 0, r.text
    sidecar = json.loads((run / "export" / "model.pt.json").read_text())
    assert sidecar["parity"]["passed"] and sidecar["parity"]["top1_identical"] == 2
    assert sidecar["source"]["backbone"] == backbone
