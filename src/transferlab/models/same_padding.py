"""TensorFlow 'SAME' convolutions without a padded copy of their input.

timm builds its TensorFlow ports (`tf_*`, the offline EfficientNet-Lite weights among them) with
`Conv2dSame`, which pads every input of a strided convolution with `F.pad` — a full copy of the
activation, the largest of the network (the first depthwise stride-2 convolution of Lite0 at 288 px
reads 96 x 144 x 144 values an image) — because TF puts the odd padding pixel on the bottom/right,
which `conv2d`'s symmetric `padding` cannot say. The same windows come out of a symmetric padding of
the larger side when the kernel gets a leading row/column of zeros: window j then starts one pixel
earlier and its first tap multiplies that pixel by 0. Only the (tiny) kernel is padded.

Measured with `bench/same_padding.py` (Lite0, channels-last, 2-core AVX512-BF16 CPU, medians of 5
interleaved rounds): inference at 288 px, batch 64, fp32 27.1 -> 30.6 img/s and bf16 56.9 -> 65.5 img/s;
a fine-tuning step (fp32, 224 px, batch 32, stem and first four stages frozen as the default `exp:3`
decay leaves them) 37.6 -> 43.2 img/s; outputs and frozen features bit-identical, fp32 and bf16. A step
that records every convolution was no faster this way in a first, two-round measurement (33.0/30.7 ->
28.4/30.6 img/s: the larger kernel's backward), so a convolution autograd records keeps timm's padded path.
So does a traced one (TorchScript/ONNX export): its padding must stay a function of the input size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers.conv2d_same import Conv2dSame
from timm.layers.padding import get_same_padding
from torch import nn

__all__ = ["ShiftedSameConv2d", "use_shifted_same_padding"]


class ShiftedSameConv2d(Conv2dSame):
    """`Conv2dSame` with the same parameters and outputs; without gradients it pads the kernel, not the input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return super().forward(x)
        if torch.jit.is_tracing() or torch.jit.is_scripting():
            # Under torch.jit.trace (TorchScript and ONNX export) sizes are traced tensors: timm's path turns
            # them into a padding computed in the graph, so the file stays right at any input size, where
            # int paddings here would be baked in for the traced size (and conv2d refuses tensor paddings).
            return super().forward(x)
        pad_h = get_same_padding(x.shape[-2], self.weight.shape[-2], self.stride[0], self.dilation[0])
        pad_w = get_same_padding(x.shape[-1], self.weight.shape[-1], self.stride[1], self.dilation[1])
        if self.dilation != (1, 1) and (pad_h % 2 or pad_w % 2):  # a leading zero tap would be dilated too
            return super().forward(x)
        weight = self.weight
        if pad_h % 2 or pad_w % 2:  # TF: the odd pixel goes bottom/right; here: one zero tap on top/left
            weight = F.pad(weight, (pad_w % 2, 0, pad_h % 2, 0))
        return F.conv2d(x, weight, self.bias, self.stride, (pad_h - pad_h // 2, pad_w - pad_w // 2),
                        self.dilation, self.groups)


def use_shifted_same_padding(model: nn.Module) -> int:
    """Switch every timm `Conv2dSame` in `model` to :class:`ShiftedSameConv2d` in place (same state dict,
    same outputs); returns how many. Subclasses of `Conv2dSame` are left alone."""
    swapped = 0
    for module in model.modules():
        if type(module) is Conv2dSame:
            module.__class__ = ShiftedSameConv2d
            swapped += 1
    return swapped
