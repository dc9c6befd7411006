"""TF-'SAME' convolutions: timm's padded copy vs transferlab's shifted kernel (models/same_padding.py).

Interleaved rounds on one model (EfficientNet-Lite0, channels-last, random inputs): inference in fp32
and in bf16 autocast (where the CPU has native bf16) at 288 px, batch 64 — the evaluation and the
frozen feature pass — and a fine-tuning step at 224 px, batch 32, fp32, with the stem and the first
four stages frozen as transferlab's default `exp:3` decay leaves them. Prints the median images/s and
every round; outputs are compared once (they must be identical).

    .venv/bin/python bench/same_padding.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from timm.layers.conv2d_same import Conv2dSame

from transferlab import _runtime
from transferlab.models.heads import HeadConfig, build_classifier
from transferlab.models.registry import resolve_backbone
from transferlab.models.same_padding import ShiftedSameConv2d

FROZEN_PREFIXES = ("conv_stem.", "bn1.", "blocks.0.", "blocks.1.", "blocks.2.", "blocks.3.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    _runtime.setup_torch()
    model = build_classifier(resolve_backbone("efficientnet_lite0"), 2, HeadConfig()).eval()
    model = model.to(memory_format=torch.channels_last)
    convs = [m for m in model.modules() if isinstance(m, Conv2dSame)]
    for name, p in model.named_parameters():
        p.requires_grad = not name.startswith(FROZEN_PREFIXES)
    torch.manual_seed(0)
    x288 = torch.randn(64, 3, 288, 288).contiguous(memory_format=torch.channels_last)
    x224 = torch.randn(32, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (32,))
    bf16 = _runtime.cpu_supports_bf16()

    def use(kind: type) -> None:
        for m in convs:
            m.__class__ = kind

    def infer(dtype: torch.dtype | None) -> float:
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            t = time.perf_counter()
            model(x288)
            return 64 / (time.perf_counter() - t)

    def step() -> float:
        model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        F.cross_entropy(model(x224), y).backward()
        return 32 / (time.perf_counter() - t)

    outputs = []
    for kind in (Conv2dSame, ShiftedSameConv2d):
        use(kind)
        with torch.no_grad():
            outputs.append(model(x288[:4]))
    print(f"{len(convs)} TF-SAME convolutions; fp32 outputs identical: {torch.equal(*outputs)}")
    cases = {"inference fp32 288px b64": lambda: infer(None), "fine-tuning step fp32 224px b32": step}
    if bf16:
        cases["inference bf16 288px b64"] = lambda: infer(torch.bfloat16)
    results: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds + 1):  # the first round warms up and is dropped
        for kind in (Conv2dSame, ShiftedSameConv2d):
            use(kind)
            for case, run in cases.items():
                results.setdefault((case, kind.__name__), []).append(run())
    for (case, kind), rates in results.items():
        kept = rates[1:]
        print(f"{case:32s} {kind:18s} median {statistics.median(kept):6.1f} img/s  rounds {[round(r, 1) for r in kept]}")


if __name__ == "__main__":
    main()
