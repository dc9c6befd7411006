"""Deterministic mode's NaN fill: one fine-tuning step's throughput with and without it.

`torch.use_deterministic_algorithms(True)` (what Lightning's `Trainer(deterministic=True)` sets,
on CPU in transferlab) also fills every newly allocated tensor with NaN unless
`torch.utils.deterministic.fill_uninitialized_memory` is False, which transferlab sets while it
fine-tunes (`_runtime.deterministic_scope`). Each mode runs in its own process, interleaved over
rounds so that the machine's drift hits all three alike.

    .venv/bin/python bench/deterministic_fill.py [--rounds 4] [--steps 10] [--size 224] [--batch 32]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

MODES = ("det-fill", "det-nofill", "off")


def step_rate(mode: str, steps: int, size: int, batch: int) -> float:
    """Images/s of Lite0 fine-tuning steps (fp32, channels-last, BatchNorm in eval mode, AdamW)."""
    import torch

    from transferlab import _runtime
    from transferlab.models.heads import HeadConfig, build_classifier
    from transferlab.models.registry import resolve_backbone

    _runtime.setup_torch()
    if mode != "off":
        torch.use_deterministic_algorithms(True)
        torch.utils.deterministic.fill_uninitialized_memory = mode == "det-fill"
    model = build_classifier(resolve_backbone("efficientnet_lite0", pretrained=True), 2, HeadConfig())
    model = model.to(memory_format=torch.channels_last).train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch,))

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(2):  # warm-up: allocator, oneDNN primitives
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # one measurement, in a child
    args = ap.parse_args()
    if args.mode:
        print(f"{step_rate(args.mode, args.steps, args.size, args.batch):.2f}")
        return
    rates: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(1, args.rounds + 1):
        for mode in MODES:
            out = subprocess.run([sys.executable, __file__, "--mode", mode, "--steps", str(args.steps),
                                  "--size", str(args.size), "--batch", str(args.batch)],
                                 capture_output=True, text=True, check=True)
            rates[mode].append(float(out.stdout.strip().splitlines()[-1]))
            print(f"round {r} {mode:10s} {rates[mode][-1]:.1f} img/s", flush=True)
    for mode in MODES:
        print(f"{mode:10s} {min(rates[mode]):.1f}-{max(rates[mode]):.1f} img/s over {args.rounds} rounds "
              f"(Lite0 training step, {args.size} px, batch {args.batch}, fp32, channels-last)")


if __name__ == "__main__":
    main()
