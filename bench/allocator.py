"""Allocator A/B: the same `transferlab train` with glibc's malloc tuned (the default) and untuned.

transferlab calls glibc `mallopt` at start-up (see `src/transferlab/_runtime.py`) so that freed
activation memory stays in the process instead of being returned to the kernel after every batch and
faulted back in. This script proves it on real data with the page-fault count of each run, and
checks that the results are identical (only the speed may differ).

    .venv/bin/python bench/allocator.py [--data ../shared/data/hymenoptera_data] [--epochs 1]
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(data: Path, epochs: int, tuned: bool, workdir: Path) -> dict:
    out = workdir / ("tuned" if tuned else "untuned")
    env = {**os.environ, "TRANSFERLAB_TUNE_MALLOC": "1" if tuned else "0", "TRANSFERLAB_HOME": str(workdir / "home")}
    cmd = [sys.executable, "-m", "transferlab", "train", str(data), "--strategy", "full",
           "--epochs-finetune", str(epochs), "--out", str(out), "--no-report", "--no-progress"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"transferlab train failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return {
        "tuned": tuned,
        "wall_s": wall,
        "epoch_s": sum(float(r["epoch_seconds"]) for r in rows),
        "minflt": after.ru_minflt - before.ru_minflt,
        "maxrss_mb": after.ru_maxrss / 1024,
        "val": [(r["val_loss"], r["val_accuracy"]) for r in rows],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "hymenoptera_data")
    p.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs per run")
    args = p.parse_args()
    if not args.data.exists():
        sys.exit(f"data not found: {args.data}")
    with tempfile.TemporaryDirectory(prefix="tl-alloc-") as tmp:
        results = [run(args.data, args.epochs, tuned, Path(tmp)) for tuned in (False, True)]
    for r in results:
        print(f"malloc {'tuned  ' if r['tuned'] else 'default'}  wall {r['wall_s']:6.1f} s  "
              f"fine-tune epochs {r['epoch_s']:6.1f} s  minor page faults {r['minflt']:>10,}  "
              f"max RSS of any run so far {r['maxrss_mb']:,.0f} MB")
    same = results[0]["val"] == results[1]["val"]
    print(f"identical metrics: {same}")
    print(f"fault_ratio={results[0]['minflt'] / max(1, results[1]['minflt']):.2f}")


if __name__ == "__main__":
    main()
