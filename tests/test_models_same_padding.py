"""TF-'SAME' convolutions computed without a padded copy of the input: same outputs, same gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.layers.conv2d_same import Conv2dSame

from transferlab.models import same_padding
from transferlab.models.registry import create_backbone, resolve_backbone
from transferlab.models.same_padding import ShiftedSameConv2d, use_shifted_same_padding


def _pair(in_ch: int, out_ch: int, kernel: int, stride: int, groups: int = 1, dilation: int = 1):
    torch.manual_seed(0)
    reference = Conv2dSame(in_ch, out_ch, kernel, stride=stride, groups=groups, dilation=dilation)
    shifted = Conv2dSame(in_ch, out_ch, kernel, stride=stride, groups=groups, dilation=dilation)
    shifted.load_state_dict(reference.state_dict())
    assert use_shifted_same_padding(shifted) == 1
    return reference, shifted


@pytest.mark.parametrize("kernel, stride, groups, dilation", [
    (3, 2, 1, 1), (3, 2, 8, 1), (5, 2, 8, 1), (3, 1, 1, 1), (4, 1, 1, 1), (3, 2, 1, 2), (1, 2, 1, 1),
])
@pytest.mark.parametrize("size", [(16, 16), (17, 17), (15, 22), (1, 1)])
def test_shifted_same_convolution_equals_timms_without_gradients(kernel, stride, groups, dilation, size):
    reference, shifted = _pair(8, 8, kernel, stride, groups, dilation)
    x = torch.randn(2, 8, *size)
    with torch.no_grad():
        expected, got = reference(x), shifted(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_no_copy_of_the_input_is_padded_when_no_gradient_is_recorded(monkeypatch):
    _, shifted = _pair(8, 8, 3, 2, groups=8)
    padded = []
    real_pad = F.pad
    monkeypatch.setattr(F, "pad", lambda t, *a, **k: padded.append(tuple(t.shape)) or real_pad(t, *a, **k))
    x = torch.randn(2, 8, 16, 16)
    with torch.no_grad():
        shifted(x)
    assert padded == [(8, 1, 3, 3)]  # the kernel only
    padded.clear()
    shifted(x)  # with gradients: timm's padded path, whose backward measured faster
    assert (2, 8, 16, 16) in padded


def test_gradients_flow_as_through_timms_convolution():
    reference, shifted = _pair(4, 6, 3, 2)
    x = torch.randn(2, 4, 10, 10, requires_grad=True)
    reference(x).square().sum().backward()
    grads = reference.weight.grad.clone(), x.grad.clone()
    x.grad = None
    shifted(x).square().sum().backward()
    torch.testing.assert_close(shifted.weight.grad, grads[0])
    torch.testing.assert_close(x.grad, grads[1])


def test_backbones_are_built_with_the_shifted_convolution_and_give_the_same_outputs():
    model = create_backbone(resolve_backbone("tf_efficientnet_lite0", pretrained=False)).eval()
    convs = [m for m in model.modules() if isinstance(m, Conv2dSame)]
    assert convs and all(type(m) is ShiftedSameConv2d for m in convs)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fast = model(x)
        for m in convs:
            m.__class__ = Conv2dSame
        slow = model(x)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    assert same_padding.use_shifted_same_padding(torch.nn.Conv2d(3, 3, 3)) == 0
