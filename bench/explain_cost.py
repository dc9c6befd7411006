"""What a class-activation map costs: seconds per image of `predict --explain` / `Classifier.explain` on
EfficientNet-Lite0 (offline ImageNet weights, BatchNorm folded as every inference path runs it) at 224 px,
next to the plain forward pass `predict` makes, on this machine.

    .venv/bin/python bench/explain_cost.py [--rounds 5]

Per batch size: the median over rounds of (a) the no-grad forward, (b) the Grad-CAM forward + backward to
the last stage (CamExplainer.heatmaps), (c) drawing and saving the overlay PNG. Synthetic 224-px images:
the cost does not depend on what they show. Prints one Markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from transferlab import _runtime
from transferlab.evaluation.explain import CamExplainer, render_overlay
from transferlab.models.fold_bn import folded_for_inference
from transferlab.models.heads import build_classifier
from transferlab.models.registry import resolve_backbone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-sizes", default="1,8")
    args = parser.parse_args()
    _runtime.setup_torch()
    spec = resolve_backbone("efficientnet_lite0", pretrained=True, img_size=224)
    model = folded_for_inference(build_classifier(spec, 10).eval(), 224).to(memory_format=torch.channels_last)
    start = time.perf_counter()
    explainer = CamExplainer(model, spec.preprocessing, [str(i) for i in range(10)])
    layer_seconds = time.perf_counter() - start
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)) for _ in range(8)]
    views = [explainer.view(im) for im in images]
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for b in map(int, args.batch_sizes.split(",")):
            batch = views[:b]
            x = torch.stack([explainer._to_input(v) for v in batch]).contiguous(memory_format=torch.channels_last)
            forward, cam, draw = [], [], []
            explainer.heatmaps(batch)  # warm-up
            for _ in range(args.rounds):
                t = time.perf_counter()
                with torch.inference_mode():
                    model(x)
                forward.append((time.perf_counter() - t) / b)
                t = time.perf_counter()
                maps, _ = explainer.heatmaps(batch)
                cam.append((time.perf_counter() - t) / b)
                t = time.perf_counter()
                for i, (v, m) in enumerate(zip(batch, maps)):
                    render_overlay(v, m, "label 0.99").save(Path(out) / f"{i}.png")
                draw.append((time.perf_counter() - t) / b)
            rows.append((b, *(statistics.median(s) for s in (forward, cam, draw))))
    print(f"target layer {explainer.target.name} ({explainer.target.grid}x{explainer.target.grid}), found in "
          f"{layer_seconds:.2f} s once per model; {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| batch | forward s/img (predict) | Grad-CAM s/img | overlay PNG s/img | explain total s/img | x predict |")
    print("|---|---|---|---|---|---|")
    for b, f, c, d in rows:
        print(f"| {b} | {f:.3f} | {c:.3f} | {d:.3f} | {c + d:.3f} | {(c + d) / f:.1f} |")


if __name__ == "__main__":
    main()
