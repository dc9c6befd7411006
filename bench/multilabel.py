"""A real multi-label check (issue 23): pairs of images of two different classes pasted side by side,
labelled with both, from a suite dataset's own train/val/test splits; the default Lite0 run trains on
them and is scored on the test composites (mAP, micro/macro F1, subset accuracy).

Each source image is used once per split (shuffled, paired with the next one of another class), so no
image appears in two splits. A composite is square: each half is its image squeezed to half the width
(a side-by-side strip would lose both outer quarters to the eval transform's centre crop).

    .venv/bin/python bench/multilabel.py [--dataset scene15] [--work /tmp/ml-bench] [--side 256]
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import time
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "../shared/data/suite"


def pairs_of(files: list[tuple[Path, str]], seed: int) -> list[tuple[tuple[Path, str], tuple[Path, str]]]:
    """Each file at most once, paired with the next unused file of another class."""
    pool = list(files)
    random.Random(seed).shuffle(pool)
    pairs = []
    while len(pool) >= 2:
        first = pool.pop()
        other = next((i for i in range(len(pool) - 1, -1, -1) if pool[i][1] != first[1]), None)
        if other is None:
            break
        pairs.append((first, pool.pop(other)))
    return pairs


def build(dataset: Path, work: Path, side: int, seed: int) -> tuple[Path, dict[str, int]]:
    """The composites under work/images and work/labels.csv (path,labels,split); returns the CSV and counts."""
    (work / "images").mkdir(parents=True, exist_ok=True)
    rows, counts = [], {}
    for split in ("train", "val", "test"):
        files = sorted((p, p.parent.name) for p in (dataset / split).glob("*/*") if p.is_file())
        pairs = pairs_of(files, seed + {"train": 0, "val": 1, "test": 2}[split])
        for i, ((a, la), (b, lb)) in enumerate(pairs):
            out = work / "images" / f"{split}-{i:04d}.jpg"
            if not out.exists():
                canvas = Image.new("RGB", (side, side))
                for x, path in ((0, a), (side // 2, b)):
                    with Image.open(path) as image:
                        canvas.paste(image.convert("RGB").resize((side // 2, side), Image.Resampling.BICUBIC), (x, 0))
                canvas.save(out, quality=92)
            rows.append((f"images/{out.name}", ";".join(sorted({la, lb})), split))
        counts[split] = len(pairs)
    csv_path = work / "labels.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "labels", "split"])
        writer.writerows(rows)
    return csv_path, counts


def _value(text: str):
    """A --set value as YAML reads it (numbers, booleans), else the text."""
    import yaml

    return yaml.safe_load(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="scene15")
    parser.add_argument("--work", type=Path, default=Path("/tmp/transferlab-multilabel-bench"))
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="train options other than the defaults, e.g. label_smoothing=0 epochs_frozen=32")
    args = parser.parse_args()
    options = {key: _value(value) for key, _, value in (item.partition("=") for item in args.set)}

    import transferlab

    csv_path, counts = build((SUITE / args.dataset).resolve(), args.work / args.dataset, args.side, args.seed)
    run = args.work / f"{args.dataset}-run"
    shutil.rmtree(run, ignore_errors=True)  # this script's own run from last time (the feature cache stays)
    t0 = time.perf_counter()
    result = transferlab.train(csv_path, out=str(run), progress=False, report=False, **options)
    train_seconds = time.perf_counter() - t0
    evaluation = transferlab.evaluate(run, split="test", progress=False, plots=False)
    m = evaluation.metrics
    print(json.dumps({
        "dataset": args.dataset, "options": options, "composites": counts, "labels": len(result.classes),
        "task": result.summary["task"], "val_map_best": round(result.val_accuracy_best, 4),
        "best": result.summary["best"], "finetune": (result.summary.get("finetune") or {}).get("skipped")
        or (result.summary.get("finetune") or {}).get("epochs_run"),
        "test": {"map": round(m["map"], 4), "micro_f1": round(m["micro"]["f1"], 4),
                 "macro_f1": round(m["macro"]["f1"], 4), "subset_accuracy": round(m["subset_accuracy"], 4),
                 "hamming_accuracy": round(m["hamming_accuracy"], 4), "label_cardinality": m["label_cardinality"],
                 "predicted_cardinality": round(m["predicted_cardinality"], 3), "n": m["n"]},
        "train_seconds": round(train_seconds, 1), "phase_seconds": result.summary["phase_seconds"],
    }, indent=2))


if __name__ == "__main__":
    main()
