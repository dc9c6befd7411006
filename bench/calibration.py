"""Calibration and abstention on real data (issue 22, items 1-2): for each suite dataset, train the
default run (temperature fitted on val at the end), then evaluate it on the TEST split and print

  test ECE and log loss before / after temperature scaling, the fitted T,
  `predict --unknown auto` (threshold chosen on val for --target-precision): its test coverage and precision,
  `predict --sets 0.9` (split-conformal, LAC, q̂ from val): its test coverage and mean set size.

    .venv/bin/python bench/calibration.py                                   # 3 suite datasets, seed 0
    .venv/bin/python bench/calibration.py --datasets scene15 --train-args "--epochs-finetune 0"
    .venv/bin/python bench/calibration.py --out runs/cal --reuse --sets 0.99  # other levels, same runs

The last lines are a markdown table (for bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "../shared/data/suite"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="scene15,brain_tumor_mri,potato_leaf")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target-precision", type=float, default=0.99)
    parser.add_argument("--sets", type=float, default=0.9)
    parser.add_argument("--train-args", default="", help="extra `transferlab train` options")
    parser.add_argument("--out", type=Path, default=None, help="where the runs go (default: a temp dir)")
    parser.add_argument("--reuse", action="store_true", help="skip training where --out already holds the run")
    args = parser.parse_args()

    import transferlab  # noqa: F401  (fails early when the package is not importable)
    from transferlab.api import evaluate
    from transferlab.evaluation.abstain import selective_metrics

    out = args.out or Path(tempfile.mkdtemp(prefix="calibration-bench-"))
    rows = []
    for name in args.datasets.split(","):
        data = (SUITE / name).resolve()
        run = out / name
        cmd = [sys.executable, "-m", "transferlab", "train", str(data), "--out", str(run), "--seed", str(args.seed),
               "--no-report", "--no-progress", *shlex.split(args.train_args)]
        start = time.perf_counter()
        if not (args.reuse and (run / "model.json").is_file()):
            subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
        train_s = time.perf_counter() - start
        result = evaluate(run, split="test", plots=False, progress=False)
        cal = json.loads((run / "model.json").read_text())["calibration"]
        m = result.metrics
        sel = selective_metrics(result.probabilities, result.targets, cal, target_precision=args.target_precision,
                                coverage=args.sets)
        auto, sets = sel["unknown_auto"], sel["sets"]
        row = {
            "dataset": name, "n_val": cal["n"], "n_test": m["n"], "accuracy": m["accuracy"], "T": cal["temperature"],
            "ece_before": m["calibration"]["ece_before"], "ece_after": m["ece"],
            "nll_before": m["calibration"]["log_loss_before"], "nll_after": m["log_loss"],
            "val_nll_before": cal["val_log_loss"]["before"], "val_nll_after": cal["val_log_loss"]["after"],
            "auto_threshold": auto["threshold"], "auto_val_coverage": auto["val_coverage"],
            "auto_test_coverage": auto["coverage"], "auto_test_precision": auto["precision"],
            "sets_test_coverage": sets["coverage"], "sets_mean_size": sets["mean_size"],
            "train_s": round(train_s, 1), "note": cal.get("note", ""),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {when}; seed {args.seed}; "
          f"`bench/calibration.py --datasets {args.datasets}"
          f"{' --train-args ' + shlex.quote(args.train_args) if args.train_args else ''}`\n")
    print("| dataset | val / test images | test acc % | T | test ECE before → after | test log loss before → after "
          f"| --unknown auto (precision {args.target_precision}): threshold, val / test coverage, test precision "
          f"| --sets {args.sets}: test coverage, mean size |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        precision = "—" if r["auto_test_precision"] is None else f"{r['auto_test_precision']:.3f}"
        val_cov = "—" if r["auto_val_coverage"] is None else f"{r['auto_val_coverage']:.3f}"
        print(f"| {r['dataset']} | {r['n_val']} / {r['n_test']} | {100 * r['accuracy']:.1f} | {r['T']:.3f} "
              f"| {r['ece_before']:.4f} → {r['ece_after']:.4f} | {r['nll_before']:.4f} → {r['nll_after']:.4f} "
              f"| {r['auto_threshold']:.3f}, {val_cov} / {r['auto_test_coverage']:.3f}, {precision} "
              f"| {r['sets_test_coverage']:.3f}, {r['sets_mean_size']:.2f} |")


if __name__ == "__main__":
    main()
