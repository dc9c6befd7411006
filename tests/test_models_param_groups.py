"""Blocks, freezing and discriminative learning-rate param groups."""

from __future__ import annotations

import itertools

import pytest
import torch
import torchvision

from transferlab.models.heads import HeadConfig, build_classifier, head_slot, replace_head
from transferlab.models.param_groups import (
    backbone_blocks,
    discriminative_param_groups,
    freeze_backbone,
    parse_decay,
    unfreeze,
)
from transferlab.models.registry import resolve_backbone

LR = 1e-3


@pytest.fixture(scope="module")
def resnet18():
    model = torchvision.models.resnet18()
    replace_head(model, 4)
    return model


def _fresh_resnet18():
    model = torchvision.models.resnet18()
    replace_head(model, 4)
    return model


def test_resnet18_blocks(resnet18):
    blocks = backbone_blocks(resnet18)
    assert [name for name, _ in blocks] == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert blocks[0][1] == ["conv1.weight", "bn1.weight", "bn1.bias"]
    head_ids = {id(p) for p in head_slot(resnet18).parameters()}
    expected = [n for n, p in resnet18.named_parameters() if id(p) not in head_ids]
    assert [n for _, names in blocks for n in names] == expected  # input -> output order, each once


def test_exp_decay_resnet18(resnet18):
    groups = discriminative_param_groups(resnet18, LR, "exp:3")
    assert [g["name"] for g in groups] == ["head", "layer4", "layer3", "layer2", "layer1", "stem"]
    assert [g["lr"] for g in groups] == pytest.approx([LR, LR, LR / 3, LR / 9, LR / 27, LR / 81])
    assert all(g["weight_decay"] == 0.0 for g in groups)
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len(list(resnet18.parameters()))
    torch.optim.SGD(groups, lr=LR)  # valid optimizer input


def test_none_decay_keeps_one_lr(resnet18):
    groups = discriminative_param_groups(resnet18, LR)
    assert {g["lr"] for g in groups} == {LR}


def test_linear_decay_vgg11():
    model = torchvision.models.vgg11()
    replace_head(model, 3)
    blocks = backbone_blocks(model)
    assert blocks[0][0] == "features.0" and blocks[-1][0] == "classifier.3"
    assert [n for n, _ in blocks[-2:]] == ["classifier.0", "classifier.3"]
    groups = {g["name"]: g["lr"] for g in discriminative_param_groups(model, 1e-4, "linear:1e-7")}
    assert groups["features.0"] == pytest.approx(1e-7)  # first conv
    assert groups["classifier.3"] == pytest.approx(1e-4)  # top block
    assert groups["head"] == 1e-4
    lrs = [groups[name] for name, _ in blocks]
    assert lrs == sorted(lrs) and len(set(lrs)) == len(lrs)
    diffs = [b - a for a, b in itertools.pairwise(lrs)]
    assert diffs == pytest.approx([diffs[0]] * len(diffs))


def test_layer_decay_timm():
    model = build_classifier(resolve_backbone("test_vit", pretrained=False), 3, load_weights=False)
    blocks = backbone_blocks(model)
    assert blocks[0][0] == "cls_token+pos_embed+patch_embed.proj" and blocks[-1][0] == "blocks.5+norm"
    groups = discriminative_param_groups(model, LR, "layer:0.75")
    n = len(blocks)
    assert [g["name"] for g in groups] == ["head"] + [name for name, _ in reversed(blocks)]
    assert [g["lr"] for g in groups] == pytest.approx([LR] + [LR * 0.75**k for k in range(1, n + 1)])
    assert [g["lr_scale"] for g in groups] == pytest.approx([g["lr"] / LR for g in groups])


def test_timm_resnet_uses_group_matcher():
    model = build_classifier(resolve_backbone("test_resnet", pretrained=False), 3, load_weights=False)
    names = [name for name, _ in backbone_blocks(model)]
    assert names == ["conv1+bn1", "layer1.0", "layer2.0", "layer3.0", "layer4.0"]


def test_freeze_and_unfreeze_last_k():
    model = _fresh_resnet18()
    head = set(head_slot(model).parameters())
    freeze_backbone(model)
    assert all(p.requires_grad == (p in head) for p in model.parameters())

    unfreeze(model, last_k=2)
    trainable_blocks = [
        name for name, names in backbone_blocks(model)
        if all(dict(model.named_parameters())[n].requires_grad for n in names)
    ]
    assert trainable_blocks == ["layer3", "layer4"]
    assert not model.conv1.weight.requires_grad and not model.layer2[0].conv1.weight.requires_grad
    assert all(p.requires_grad for p in head)
    groups = discriminative_param_groups(model, LR, "exp:3")
    assert [g["name"] for g in groups] == ["head", "layer4", "layer3"]  # frozen params left out

    unfreeze(model)
    assert all(p.requires_grad for p in model.parameters())
    groups = discriminative_param_groups(model, LR, "exp:3", last_k=1)
    assert [g["name"] for g in groups] == ["head", "layer4"]


def test_no_weight_decay_for_1d_params(resnet18):
    groups = discriminative_param_groups(resnet18, LR, "exp:2", weight_decay=0.05)
    for g in groups:
        dims = {p.ndim for p in g["params"]}
        if g["weight_decay"] == 0.0:
            assert dims == {1}, g["name"]
        else:
            assert g["weight_decay"] == 0.05 and min(dims) > 1, g["name"]
    layer4 = [g for g in groups if g["name"] == "layer4"]
    assert len(layer4) == 2 and [g["lr"] for g in layer4] == pytest.approx([LR, LR])


def test_timm_no_weight_decay_names():
    model = build_classifier(resolve_backbone("test_vit", pretrained=False), 3, load_weights=False)
    groups = discriminative_param_groups(model, LR, weight_decay=0.1)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.pos_embed) not in decayed and id(model.cls_token) not in decayed


@pytest.mark.parametrize(
    ("text", "expected"),
    [("none", ("none", None)), ("exp:3", ("exp", 3.0)), ("linear:1e-7", ("linear", 1e-7)),
     ("layer:0.75", ("layer", 0.75)), (" EXP:2.5 ", ("exp", 2.5))],
)
def test_parse_decay(text, expected):
    assert parse_decay(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [("cosine", "Unknown lr decay"), ("exp", "needs a number"), ("exp:x", "needs a number"),
     ("exp:0.5", "layer:0.5"), ("layer:1.5", r"\(0, 1\]"), ("linear:-1", ">= 0"), ("none:3", "no value"),
     ("layer:nan", "finite")],
)
def test_parse_decay_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_decay(text)


def test_linear_low_above_lr_is_an_error(resnet18):
    with pytest.raises(ValueError, match="must not exceed"):
        discriminative_param_groups(resnet18, 1e-5, "linear:1e-3")


def test_mlp_head_group(resnet18):
    model = _fresh_resnet18()
    replace_head(model, 4, HeadConfig(kind="mlp", hidden=8))
    head = discriminative_param_groups(model, LR, "exp:3")[0]
    assert head["name"] == "head" and len(head["params"]) == 4
