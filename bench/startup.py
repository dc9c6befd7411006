"""Start-up: wall seconds of the short commands a user runs one at a time, and what their imports cost.

Each command is a fresh `python` process (the installed CLI's code path, `python -m transferlab`), timed
from outside in interleaved rounds after one warm-up round (file cache), so a burst of load hits every
command alike; medians are printed with the min-max. Then `python -X importtime` of the slow ones says
where the import time goes: the cumulative seconds of each heavy package where it was first imported,
and the heavy packages a command never needed but loaded anyway.

A run directory is trained when `--run` holds none (the real default backbone, frozen stage only, on
`--data`) and exported to ONNX when it has no `export/model.onnx`; neither step is timed.

    PYTHONPATH=src .venv/bin/python bench/startup.py [--run RUN] [--data ../shared/data/hymenoptera_data] [--rounds 5]
    .venv/bin/python bench/startup.py --src before=/tmp/before/src --src after=src --only predict   # A/B
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HEAVY = ("torch", "torchvision", "timm", "lightning", "torchmetrics", "sklearn", "matplotlib", "scipy", "fastapi",
         "uvicorn", "onnx", "onnxruntime", "torchcam", "safetensors", "rich", "typer", "yaml", "PIL", "numpy")

API = "import transferlab as t; c = t.load({path!r}); print(c.predict({image!r}), type(c.model))"


def commands(python: str, run: Path, onnx: Path, image: Path) -> dict[str, list[str]]:
    cli = [python, "-m", "transferlab"]
    return {
        "transferlab --version": [*cli, "--version"],
        "transferlab --help": [*cli, "--help"],
        "transferlab models --offline": [*cli, "models", "--offline"],
        "import transferlab": [python, "-c", "import transferlab"],
        "transferlab predict RUN one.jpg": [*cli, "predict", str(run), str(image)],
        "transferlab predict model.onnx one.jpg": [*cli, "predict", str(onnx), str(image)],
        "python -c load(RUN).predict": [python, "-c", API.format(path=str(run), image=str(image))],
        "python -c load(model.onnx).predict": [python, "-c", API.format(path=str(onnx), image=str(image))],
    }


def ensure_run(python: str, run: Path, data: Path) -> Path:
    """A trained run at `run` (trained here when missing) and its ONNX export's path."""
    if not (run / "model.json").is_file():
        subprocess.run([python, "-m", "transferlab", "train", str(data), "-o", str(run), "--epochs-frozen", "2",
                        "--epochs-finetune", "0", "--no-report"], check=True)
    onnx = run / "export" / "model.onnx"
    if not onnx.is_file():
        subprocess.run([python, "-m", "transferlab", "export", str(run)], check=True)
    return onnx


def timed(argv: list[str], failed: dict[str, str], name: str, env: dict[str, str] | None = None) -> float:
    """Wall seconds of one run; a failure is recorded with its last error line (and marked in the table)."""
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        failed[name] = f"rc {done.returncode}: {(done.stderr.strip().splitlines() or [''])[-1][:200]}"
    return seconds


def import_profile(argv: list[str], env: dict[str, str] | None = None) -> dict[str, object]:
    """Total import seconds (top-level entries of -X importtime) and each heavy package's cumulative seconds."""
    done = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], capture_output=True, text=True, env=env,
                          check=False)
    total, packages = 0.0, {}
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line or "cumulative" in line:
            continue
        _, cumulative, name = line.split("|")
        seconds = int(cumulative) / 1e6
        if not name.startswith("  ", 1):  # one leading space: imported by the command itself, not nested
            total += seconds
        name = name.strip()
        if name in HEAVY and name not in packages:
            packages[name] = round(seconds, 3)
    return {"imports_s": round(total, 3), "packages_s": packages}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, default=Path("bench/results/startup_run"))
    ap.add_argument("--data", type=Path, default=Path("../shared/data/hymenoptera_data"))
    ap.add_argument("--image", type=Path, help="the one image (default: the first of DATA/val)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--src", action="append", default=[], metavar="LABEL=PATH",
                    help="a source tree to time (its PYTHONPATH), repeatable: the trees' commands are interleaved "
                         "within each round, so a before/after pair shares the machine's load (default: as installed)")
    ap.add_argument("--only", help="comma-separated substrings: time only the commands whose name holds one")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    python = sys.executable
    onnx = ensure_run(python, args.run, args.data)
    image = args.image or min((args.data / "val").rglob("*.jpg"))
    todo = commands(python, args.run.resolve(), onnx.resolve(), image.resolve())
    if args.only:
        todo = {k: v for k, v in todo.items() if any(part in k for part in args.only.split(","))}
    trees = dict(item.split("=", 1) for item in args.src) or {"installed": ""}
    envs = {label: {**os.environ, "PYTHONPATH": str(Path(path).resolve())} if path else None
            for label, path in trees.items()}
    jobs = [(label, name) for name in todo for label in trees]

    loads = [os.getloadavg()[0]]
    failed: dict[str, str] = {}
    for label, name in jobs:  # warm-up: page cache and .pyc files
        timed(todo[name], failed, f"{label}: {name}", envs[label])
    times: dict[str, list[float]] = {f"{label}: {name}": [] for label, name in jobs}
    for _ in range(args.rounds):
        for label, name in jobs:
            times[f"{label}: {name}"].append(timed(todo[name], failed, f"{label}: {name}", envs[label]))
        loads.append(os.getloadavg()[0])
    profiles = {f"{label}: {name}": import_profile(todo[name], envs[label]) for label, name in jobs}

    print(f"load average (1 min) over the rounds: {min(loads):.2f}-{max(loads):.2f} on {os.cpu_count()} CPUs; "
          f"{args.rounds} rounds")
    print("| tree: command | median s | min-max s | imports s | heavy packages loaded (cumulative s) |")
    print("|---|---|---|---|---|")
    for key, seconds in times.items():
        profile = profiles[key]
        heavy = ", ".join(f"{k} {v:.2f}" for k, v in sorted(profile["packages_s"].items(), key=lambda kv: -kv[1])
                          if v >= 0.05)
        mark = f" (failed: {failed[key]})" if key in failed else ""
        print(f"| `{key}`{mark} | {statistics.median(seconds):.2f} | {min(seconds):.2f}-{max(seconds):.2f} "
              f"| {profile['imports_s']:.2f} | {heavy} |")
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    record = {"argv": sys.argv, "trees": trees, "run": str(args.run), "image": str(image), "loads": loads,
              "cpus": os.cpu_count(), "times": times, "failed": failed, "profiles": profiles}
    path = args.out / f"startup_{stamp}.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"-> {path}")
    for label in trees:
        medians = {name: statistics.median(times[f"{label}: {name}"]) for name in todo}
        print(f"startup[{label}]: " + " ".join(f"{name.replace(' ', '_')}={s:.2f}" for name, s in medians.items()))


if __name__ == "__main__":
    main()
