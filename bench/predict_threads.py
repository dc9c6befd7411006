"""`predict` over many small images: images/s by torch intra-op thread count (issue 20, item 9).

A random-init model of one backbone (saved as a run directory in a temporary folder) scores N generated
40x40 PNGs through `export.batch.iter_predictions`, the code `transferlab predict` runs, once per thread
count, in interleaved rounds; it also times the model's forward alone per input size. Prints medians and
every round. Run it on an idle machine to place a thread-count rule: on a loaded one (load average above
the core count), a descheduled OpenMP worker stalls every layer's barrier and one thread wins everywhere.

    .venv/bin/python bench/predict_threads.py [--backbone test_efficientnet] [--img-size 32] [--images 300]
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
from transferlab.export.batch import iter_predictions
from transferlab.export.predictors import TorchPredictor
from transferlab.models.heads import HeadConfig, build_classifier
from transferlab.models.registry import resolve_backbone
from transferlab.training.run import model_metadata, save_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="test_efficientnet")
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    _runtime.setup_torch()
    counts = sorted({1, _runtime.physical_cores()})
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        spec = resolve_backbone(args.backbone, pretrained=False, img_size=args.img_size)
        head = HeadConfig()
        model = build_classifier(spec, 3, head, load_weights=False).eval()
        save_model(root / "run", model, model_metadata(spec, head, ["a", "b", "c"], {}))
        rng = np.random.default_rng(0)
        files = []
        for i in range(args.images):
            files.append(root / f"{i:05d}.png")
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(files[-1])
        predictor = TorchPredictor(root / "run")
        rates: dict[int, list[float]] = {n: [] for n in counts}
        for _ in range(args.rounds):
            for n in counts:
                torch.set_num_threads(n)
                start = time.perf_counter()
                done = sum(1 for _ in iter_predictions(predictor, files, batch_size=args.batch_size))
                rates[n].append(done / (time.perf_counter() - start))
        for n in counts:
            print(f"predict, {n} thread(s): {statistics.median(rates[n]):.0f} img/s "
                  f"(rounds: {', '.join(f'{r:.0f}' for r in rates[n])})")
        for size in (args.img_size, 2 * args.img_size, 4 * args.img_size):
            x = torch.randn(args.batch_size, 3, size, size).contiguous(memory_format=torch.channels_last)
            line = []
            for n in counts:
                torch.set_num_threads(n)
                with torch.inference_mode():
                    predictor.model(x)
                    start, reps = time.perf_counter(), 0
                    while time.perf_counter() - start < 1.0:
                        predictor.model(x)
                        reps += 1
                line.append(f"{n} thread(s) {(time.perf_counter() - start) / reps * 1000:.1f} ms")
            print(f"forward, batch {args.batch_size} at {size} px: {'; '.join(line)}")


if __name__ == "__main__":
    main()
