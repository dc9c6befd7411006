"""How the data doctor's near-duplicate search scales: `evaluation.neighbours.similar_pairs` on N random
D-dimensional embeddings (efficientnet_lite0's width by default) with planted near-copies, timed, with the
process's peak memory. Usage: .venv/bin/python bench/doctor_scale.py --n 100000 [--dim 1280]"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from transferlab.evaluation.neighbours import similar_pairs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=1280)
    p.add_argument("--planted", type=int, default=50, help="near-copies planted (noise 0.05 per feature)")
    p.add_argument("--threshold", type=float, default=0.97)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    # pooled CNN features are non-negative and correlated; a ReLU of Gaussians with a shared mean is closer to
    # them than plain Gaussians (whose pairs are near-orthogonal)
    features = np.maximum(rng.standard_normal((args.n, args.dim), dtype=np.float32) + 0.5, 0)
    sources = rng.choice(args.n, size=args.planted, replace=False)
    copies = rng.choice(np.setdiff1d(np.arange(args.n), sources), size=args.planted, replace=False)
    features[copies] = features[sources] + 0.05 * rng.standard_normal((args.planted, args.dim), dtype=np.float32)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    pairs = similar_pairs(features, args.threshold)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    planted = {tuple(sorted(p)) for p in zip(sources.tolist(), copies.tolist())}
    found = {(i, j) for i, j, _ in pairs}
    print(f"n={args.n} dim={args.dim} threads={torch.get_num_threads()} seconds={seconds:.1f} "
          f"pairs={len(pairs)} planted_found={len(planted & found)}/{len(planted)} "
          f"features_mb={features.nbytes / 2**20:.0f} peak_rss_mb={peak / 1024:.0f} (before search {before / 1024:.0f})")


if __name__ == "__main__":
    main()
