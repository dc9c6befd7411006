"""Phone-camera photos: where decoding and resizing, not the network, set the pace.

Makes a copy of an ImageFolder data set whose photos are upscaled to a 3024-px short side (what a
12-MP phone camera writes; a little grain so JPEG does not compress them flat) and times one
`transferlab train` on it from a cold feature cache: wall, phases, each fine-tuning epoch, and the
report after training. Run it against another checkout with `PYTHONPATH=<checkout>/src` to A/B.

    .venv/bin/python bench/large_photos.py [--data ../shared/data/hymenoptera_data] [--photos /tmp/phone]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def make_photos(data: Path, photos: Path, short_side: int) -> int:
    """The copy, made once (an existing copy is reused); returns the number of files."""
    files = sorted(p for p in data.glob("*/*/*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    rng = np.random.default_rng(0)
    for f in files:
        out = (photos / f.relative_to(data)).with_suffix(".jpg")
        if out.exists():
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        image = Image.open(f).convert("RGB")
        scale = short_side / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
        grain = rng.integers(-6, 7, (image.height, image.width, 1), dtype=np.int16)
        pixels = np.clip(np.asarray(image).astype(np.int16) + grain, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return len(files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/data/hymenoptera_data")
    ap.add_argument("--photos", type=Path, default=Path(tempfile.gettempdir()) / "transferlab-large-photos")
    ap.add_argument("--short-side", type=int, default=3024)
    ap.add_argument("--train-args", default="--epochs-finetune 2 --finetune-gate 0",
                    help="extra `transferlab train` arguments (default: two fine-tuning epochs, ungated)")
    args = ap.parse_args()
    if not args.data.is_dir():
        sys.exit(f"no data at {args.data} (give --data)")
    start = time.perf_counter()
    n = make_photos(args.data, args.photos, args.short_side)
    print(f"{n} photos at a {args.short_side}-px short side in {args.photos} ({time.perf_counter() - start:.0f}s)")
    with tempfile.TemporaryDirectory() as work:
        out = Path(work) / "run"
        env = {**os.environ, "TRANSFERLAB_HOME": str(Path(work) / "home")}  # cold feature cache
        cmd = [sys.executable, "-m", "transferlab", "train", str(args.photos), "--out", str(out), "--no-progress",
               *args.train_args.split()]
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"transferlab train failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        summary = json.loads((out / "summary.json").read_text())
        with open(out / "metrics.csv") as f:
            epochs = [r for r in csv.DictReader(f) if r["phase"] == "finetune"]
    phases = "  ".join(f"{k} {v:.1f}s" for k, v in summary["phase_seconds"].items())
    print(f"wall {wall:.1f}s = train {summary['total_seconds']:.1f}s + start-up and report {wall - summary['total_seconds']:.1f}s")
    print(f"phases: {phases}")
    for r in epochs:
        print(f"fine-tuning epoch {r['epoch']}: {float(r['epoch_seconds']):.1f}s  "
              f"val loss {float(r['val_loss']):.4f}  val acc {float(r['val_accuracy']):.4f}")
    print(f"best val accuracy {summary['val_accuracy_best']:.4f}")


if __name__ == "__main__":
    main()
