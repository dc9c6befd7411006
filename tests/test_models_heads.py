"""Head replacement on many architectures: shapes, untouched backbone weights, feature bypass, blocks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from transferlab.models.heads import (
    HeadConfig,
    HeadNotFound,
    HeadSlot,
    build_classifier,
    features_only,
    find_head,
    head_slot,
    replace_head,
)
from transferlab.models.param_groups import backbone_blocks
from transferlab.models.registry import create_backbone, resolve_backbone

NUM_CLASSES = 5

# (backbone name, input size, expected classifier path before replacement, feature width)
ARCHITECTURES = [
    ("tv:vgg11", 32, "classifier.6", 4096),
    ("tv:alexnet", 64, "classifier.6", 4096),
    ("tv:resnet18", 32, "fc", 512),
    ("tv:densenet121", 32, "classifier", 1024),
    ("tv:squeezenet1_1", 64, "classifier", 512),
    ("tv:mobilenet_v3_small", 32, "classifier.3", 1024),
    ("tv:efficientnet_b0", 32, "classifier.1", 1280),
    ("tv:convnext_tiny", 32, "classifier.2", 768),
    ("tv:regnet_x_400mf", 32, "fc", 400),
    ("tv:shufflenet_v2_x0_5", 32, "fc", 1024),
    ("tv:mnasnet0_5", 32, "classifier.1", 1280),
    ("tv:vit_b_16", 32, "heads.head", 768),
    ("tv:googlenet", 32, "fc", 1024),
    ("tv:swin_t", 32, "head", 768),
    ("resnet18", 32, "fc", 512),
    ("test_resnet", 32, "fc", 96),
    ("test_efficientnet", 32, "classifier", 256),
    ("test_vit", 32, "head", 64),
    ("test_convnext", 32, "head.fc", 64),
    ("efficientnet_lite0", 32, "classifier", 1280),
    ("deit_tiny_distilled_patch16_224", 32, "head", 192),
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny inputs gain nothing from intra-op threads, and on a busy 2-core box OpenMP spin-waits
    make them 10-100x slower; restore the setting afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _backbone(name: str, size: int) -> nn.Module:
    torch.manual_seed(0)
    return create_backbone(resolve_backbone(name, pretrained=False, img_size=size))


@pytest.mark.parametrize(("name", "size", "classifier", "width"), ARCHITECTURES, ids=[a[0] for a in ARCHITECTURES])
def test_replace_head_any_architecture(name, size, classifier, width):
    model = _backbone(name, size)
    assert find_head(model) == classifier
    x = torch.randn(2, 3, size, size)
    for kind in ("linear", "mlp"):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        slot = replace_head(model, NUM_CLASSES, HeadConfig(kind=kind, hidden=16))
        assert isinstance(slot, HeadSlot) and slot.in_features == width
        assert head_slot(model) is slot and find_head(model) == classifier

        slot_paths = [n for n, m in model.named_modules(remove_duplicate=False) if m is slot]
        assert classifier in slot_paths
        kept = {k: v for k, v in before.items() if not any(_under(k, p) for p in slot_paths)}
        after = {k: v for k, v in model.state_dict().items() if not any(_under(k, p) for p in slot_paths)}
        assert kept.keys() == after.keys() and len(kept) > 0
        for key, value in kept.items():  # backbone weights byte-identical (same dtype, same values)
            assert value.dtype == after[key].dtype and torch.equal(value, after[key]), key

        model.eval()
        with torch.no_grad():
            assert model(x).shape == (2, NUM_CLASSES)
            with features_only(model):
                assert model(x).shape == (2, width)
            assert slot.bypass is False

        head_ids = {id(p) for p in slot.parameters()}
        backbone = {n for n, p in model.named_parameters() if id(p) not in head_ids}
        covered = [n for _, names in backbone_blocks(model) for n in names]
        assert len(covered) == len(set(covered)) and set(covered) == backbone, name


def _under(key: str, module_path: str) -> bool:
    return key == module_path or key.startswith(module_path + ".")


def test_head_shapes_and_dropout_modules():
    model = _backbone("tv:vgg11", 32)
    original_dropouts = [n for n, m in model.named_modules() if isinstance(m, nn.Dropout)]
    slot = replace_head(model, 3, HeadConfig(kind="mlp", hidden=8, dropout=0.3))
    kinds = [type(m) for m in slot.head]
    assert kinds == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear] and slot.head[2].p == 0.3
    assert (slot.head[0].in_features, slot.head[0].out_features, slot.head[3].out_features) == (4096, 8, 3)
    still = [n for n, m in model.named_modules() if isinstance(m, nn.Dropout) and not n.startswith("classifier.6")]
    assert still == original_dropouts  # the architecture's own dropouts stay
    assert [type(m) for m in replace_head(model, 3, HeadConfig(dropout=0.0)).head] == [nn.Linear]
    assert [type(m) for m in replace_head(model, 3, HeadConfig(dropout=0.1)).head] == [nn.Dropout, nn.Linear]


def test_squeezenet_conv_classifier_becomes_pooled_slot():
    model = _backbone("tv:squeezenet1_1", 64)
    slot = replace_head(model, 4)
    assert model.classifier is slot
    assert [type(m) for m in slot.pre] == [nn.Dropout, nn.AdaptiveAvgPool2d, nn.Flatten]
    assert sum(p.numel() for p in slot.pre.parameters()) == 0


def test_distilled_heads_share_one_slot():
    model = _backbone("deit_tiny_distilled_patch16_224", 32)
    slot = replace_head(model, 3)
    assert model.head is slot and model.head_dist is slot and model.num_classes == 3


def test_features_only_restores_on_error():
    model = _backbone("test_resnet", 32)
    slot = replace_head(model, 2)
    with pytest.raises(RuntimeError), features_only(model):
        assert slot.bypass
        raise RuntimeError("boom")
    assert slot.bypass is False


def test_errors():
    with pytest.raises(HeadNotFound, match="replace_head"):
        head_slot(_backbone("test_resnet", 32))
    with pytest.raises(ValueError, match="kind"):
        HeadConfig(kind="transformer")
    with pytest.raises(ValueError, match="dropout"):
        HeadConfig(dropout=1.0)
    with pytest.raises(HeadNotFound, match="path="):
        find_head(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    assert HeadConfig.from_dict(HeadConfig(kind="mlp", hidden=7).to_dict()) == HeadConfig(kind="mlp", hidden=7)


def test_build_classifier_state_dict_roundtrip():
    """A classifier built without weights accepts the state dict of one built with them."""
    spec = resolve_backbone("efficientnet_lite0", img_size=64)
    trained = build_classifier(spec, 3, HeadConfig(kind="mlp", hidden=8)).eval()
    fresh = build_classifier(spec, 3, HeadConfig(kind="mlp", hidden=8), load_weights=False).eval()
    assert fresh.backbone_spec == spec and fresh.preprocessing == spec.preprocessing
    fresh.load_state_dict(trained.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fresh(x), trained(x))
