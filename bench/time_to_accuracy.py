"""Time-to-accuracy: transferlab vs. the classic PyTorch transfer-learning loop vs. fastai's fine_tune.

All contenders run one after the other, in this order, on the same data, backbone and machine:

  classic      the PyTorch tutorial recipe in plain PyTorch: stage 1 trains only the new head with the
               frozen backbone re-run over the train set every epoch (16 epochs, Adam 1e-3), stage 2
               fine-tunes the whole network (8 epochs, Adam 1e-4); fp32; val accuracy every epoch.
  fastai       fastai's `fine_tune` schedule in plain PyTorch (no fastai import): 1 frozen one-cycle
               epoch (lr 2e-3), then 5 unfrozen one-cycle epochs with discriminative lrs
               (head 1e-3, body 1e-5), AdamW (wd 0.01, betas 0.9/0.99, eps 1e-5); fp32.
  transferlab  `python -m transferlab train DATA --out RUN --seed S ...` as a subprocess; its own
               per-epoch figures are read back from RUN/metrics.csv and RUN/summary.json.

The last line printed is `time_ratio=R`: transferlab's seconds (from the start of its train call, as
written in its metrics.csv) until its val accuracy first reaches the best val accuracy of the classic
loop, divided by the classic loop's total seconds; `time_ratio=inf` when it never gets there (or
could not run).

    .venv/bin/python bench/time_to_accuracy.py                        # all three, full size
    .venv/bin/python bench/time_to_accuracy.py --only classic         # just the baseline
    .venv/bin/python bench/time_to_accuracy.py --only transferlab --classic-best 0.9542 --classic-seconds 600
    .venv/bin/python bench/time_to_accuracy.py --epochs-frozen 1 --epochs-finetune 1 --fastai-epochs 1 \\
        --limit-train 32                                              # smoke test, ~1 minute
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # works as a script and as `python -m bench.…`

CONTENDERS = ("classic", "fastai", "transferlab")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time to accuracy: transferlab vs. classic PyTorch transfer learning vs. fastai fine_tune.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", type=Path, default=None,
                   help="ImageFolder root with train/ and val/ (default: ../shared/data/hymenoptera_data "
                        "relative to the repo root)")
    p.add_argument("--backbone", default="efficientnet_lite0",
                   choices=["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
    p.add_argument("--only", default=",".join(CONTENDERS),
                   help="comma-separated contenders to run (always run in the order classic, fastai, transferlab)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", default=None,
                   help="comma-separated seeds, e.g. 0,1,2: every contender once per seed; per-seed ratios, "
                        "and the last line is the median time_ratio (one run's best val accuracy on 153 images "
                        "moves by a few images with the seed)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: bench/results/)")
    p.add_argument("--transferlab-args", default="",
                   help='extra CLI arguments for `transferlab train`, one string, e.g. "--backbone efficientnet_lite0"')
    p.add_argument("--keep-run", action="store_true", help="keep transferlab's run directory (printed)")
    p.add_argument("--transferlab-cache", choices=["cold", "warm"], default="cold",
                   help="cold: run transferlab with an empty TRANSFERLAB_HOME, so its on-disk feature cache "
                        "starts empty as on a first run; warm: use the user's cache (~/.cache/transferlab)")
    p.add_argument("--classic-best", type=float, default=None,
                   help="classic best val accuracy (0-1), when classic is not run")
    p.add_argument("--classic-seconds", type=float, default=None,
                   help="classic total seconds, when classic is not run")
    p.add_argument("--tune-allocator", choices=["on", "off"], default="on",
                   help="mallopt(M_MMAP_THRESHOLD=32 MiB, M_TRIM_THRESHOLD=huge, M_TOP_PAD=1 GiB) in this "
                        "process, for the classic and fastai contenders")
    p.add_argument("--num-workers", type=int, default=0,
                   help="DataLoader workers for classic/fastai (0 measured fastest on 2 cores; see bench/README.md)")
    p.add_argument("--batch-size", type=int, default=32)
    # size overrides, for smoke tests
    p.add_argument("--epochs-frozen", type=int, default=16, help="classic stage 1 epochs")
    p.add_argument("--epochs-finetune", type=int, default=8, help="classic stage 2 epochs")
    p.add_argument("--fastai-frozen-epochs", type=int, default=1)
    p.add_argument("--fastai-epochs", type=int, default=5, help="fastai unfrozen epochs")
    p.add_argument("--limit-train", type=int, default=None, metavar="N",
                   help="use a seeded, class-balanced subsample of N train images (all contenders)")
    argv = list(sys.argv[1:] if argv is None else argv)
    # argparse takes a value that starts with "-" for an option; glue it: --transferlab-args="--x y"
    for i, a in enumerate(argv[:-1]):
        if a == "--transferlab-args":
            argv[i:i + 2] = [f"{a}={argv[i + 1]}"]
            break
    args = p.parse_args(argv)

    args.data = (args.data if args.data is not None else REPO / "../shared/data/hymenoptera_data").resolve()
    args.out = (args.out if args.out is not None else REPO / "bench/results").resolve()
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(CONTENDERS))
    if unknown or not only:
        p.error(f"--only: unknown contender(s) {unknown}; choose from {','.join(CONTENDERS)}")
    args.only = [c for c in CONTENDERS if c in only]
    try:
        args.seeds = [int(x) for x in args.seeds.split(",") if x.strip()] if args.seeds else [args.seed]
    except ValueError:
        p.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    if "classic" not in args.only and "transferlab" in args.only:
        if args.classic_best is None or args.classic_seconds is None:
            p.error("without the classic contender, pass --classic-best ACC and --classic-seconds S")
    if args.classic_best is not None and args.classic_best > 1:
        p.error("--classic-best is a fraction in [0, 1], e.g. 0.9542")
    for d in ("train", "val"):
        if not (args.data / d).is_dir():
            p.error(f"--data {args.data}: no {d}/ folder (expected an ImageFolder root with train/ and val/)")
    return args


# --------------------------------------------------------------------------------------------------
# Results bookkeeping
# --------------------------------------------------------------------------------------------------


def fmt_s(x: float | None) -> str:
    return "never" if x is None else f"{x:.1f}s"


def fmt_acc(x: float | None) -> str:
    return "none" if x is None else f"{x:.4f}"


def first_reach(records: list[dict], target: float | None, tol: float) -> float | None:
    """elapsed_s of the first epoch whose val_acc >= target (within tol), else None."""
    if target is None:
        return None
    for r in records:
        if r.get("val_acc") is not None and r["val_acc"] >= target - tol:
            return r["elapsed_s"]
    return None


def epoch_line(name: str, r: dict, n_epochs: int) -> str:
    return (f"  {name:<8} {r['phase']:<8} {r['epoch']:>2}/{n_epochs:<2}  train_loss={r['train_loss']:.4f} "
            f"train_acc={r['train_acc']:.4f}  val_loss={r['val_loss']:.4f} val_acc={r['val_acc']:.4f} "
            f"({r['val_correct']}/{r['val_total']})  epoch={r['epoch_s']:.1f}s elapsed={r['elapsed_s']:.1f}s")


# --------------------------------------------------------------------------------------------------
# Contenders
# --------------------------------------------------------------------------------------------------


def _record(name, phase, epoch, clock, t_epoch, tr, ev, f0) -> dict:
    return {
        "contender": name, "phase": phase, "epoch": epoch,
        "train_loss": tr[0], "train_acc": tr[1],
        "val_loss": ev[0], "val_acc": ev[1], "val_correct": ev[2], "val_total": ev[3],
        "epoch_s": clock() - t_epoch, "elapsed_s": clock(),
        "minflt_since_start": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0,
    }


def run_classic(args) -> dict:
    """The PyTorch transfer-learning tutorial, with Adam, on EfficientNet-Lite."""
    import _classic as C
    import torch
    from torch import nn

    f0, w0 = C.minor_faults(), C.minor_faults(resource.RUSAGE_CHILDREN)
    clock = C.Clock()  # from here: scanning the folders, loading weights, training, evaluating
    g = C.seed_everything(args.seed)
    model, pp = C.load_backbone(args.backbone, len(C.class_names(args.data)))
    train_dl, val_dl, _ = C.make_loaders(
        args.data, pp, batch_size=args.batch_size, num_workers=args.num_workers, generator=g,
        limit_train=args.limit_train, seed=args.seed)
    criterion = nn.CrossEntropyLoss()
    records = []

    # Stage 1: the ConvNet as a fixed feature extractor; only the new head learns. The frozen body is
    # still run on every train image every epoch -- that is the recipe being measured.
    for prm in model.parameters():
        prm.requires_grad = False
    for prm in model.classifier.parameters():
        prm.requires_grad = True
    opt = torch.optim.Adam(model.classifier.parameters(), lr=1e-3)
    for ep in range(1, args.epochs_frozen + 1):
        t = clock()
        model.eval()  # frozen body: BN uses its ImageNet statistics, dropout off
        tr = C.train_one_epoch(model, train_dl, opt, criterion)
        r = _record("classic", "frozen", ep, clock, t, tr, C.evaluate(model, val_dl, criterion), f0)
        records.append(r)
        print(epoch_line("classic", r, args.epochs_frozen), flush=True)

    # Stage 2: fine-tune everything.
    for prm in model.parameters():
        prm.requires_grad = True
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    for ep in range(1, args.epochs_finetune + 1):
        t = clock()
        model.train()
        tr = C.train_one_epoch(model, train_dl, opt, criterion)
        r = _record("classic", "finetune", ep, clock, t, tr, C.evaluate(model, val_dl, criterion), f0)
        records.append(r)
        print(epoch_line("classic", r, args.epochs_finetune), flush=True)

    wall = clock()
    del train_dl, val_dl, model, opt
    gc.collect()
    # DataLoader workers (if any) are joined by now; their faults land in RUSAGE_CHILDREN
    return {"records": records, "wall_s": wall, "minflt": C.minor_faults() - f0,
            "minflt_workers": C.minor_faults(resource.RUSAGE_CHILDREN) - w0}


def run_fastai(args) -> dict:
    """fastai's `Learner.fine_tune(epochs, base_lr=2e-3, freeze_epochs=1, lr_mult=100, pct_start=0.3, div=5)`.

    fastai does: freeze(); fit_one_cycle(freeze_epochs, slice(base_lr), pct_start=0.99);
    base_lr /= 2; unfreeze(); fit_one_cycle(epochs, slice(base_lr/lr_mult, base_lr), pct_start, div).
    One optimizer (two param groups: body, head) lives through both calls, as fastai's Learner keeps
    its optimizer. Simplifications, stated: the head is the same Linear(1280, n) as the classic loop
    (fastai would build a bigger head), and the frozen body is in eval mode (fastai keeps BN training).
    """
    import _classic as C
    import torch
    from torch import nn
    from torch.optim.lr_scheduler import OneCycleLR

    f0, w0 = C.minor_faults(), C.minor_faults(resource.RUSAGE_CHILDREN)
    clock = C.Clock()
    g = C.seed_everything(args.seed)
    model, pp = C.load_backbone(args.backbone, len(C.class_names(args.data)))
    # fastai's train DataLoader drops the last partial batch
    train_dl, val_dl, _ = C.make_loaders(
        args.data, pp, batch_size=args.batch_size, num_workers=args.num_workers, generator=g,
        limit_train=args.limit_train, seed=args.seed, drop_last=True)
    criterion = nn.CrossEntropyLoss()
    head = list(model.classifier.parameters())
    head_ids = {id(q) for q in head}
    body = [q for q in model.parameters() if id(q) not in head_ids]
    # fastai defaults: Adam with decoupled weight decay 0.01 (on all params), betas (0.9, 0.99), eps 1e-5
    opt = torch.optim.AdamW([{"params": body}, {"params": head}], lr=1e-3, betas=(0.9, 0.99), eps=1e-5,
                            weight_decay=0.01)

    def one_cycle(epochs: int, lrs: list[float], pct_start: float, div: float) -> OneCycleLR:
        # fastai: lr goes max/div -> max (cos) -> max/1e5 (cos); beta1 goes 0.95 -> 0.85 -> 0.95
        return OneCycleLR(opt, max_lr=lrs, total_steps=max(1, epochs * len(train_dl)), pct_start=pct_start,
                          anneal_strategy="cos", div_factor=div, final_div_factor=1e5 / div,
                          cycle_momentum=True, base_momentum=0.85, max_momentum=0.95)

    records = []
    base_lr, lr_mult = 2e-3, 100
    n_frozen, n_unfrozen = args.fastai_frozen_epochs, args.fastai_epochs

    for q in body:
        q.requires_grad = False
    # slice(base_lr): the head gets base_lr, earlier groups base_lr/10 (frozen here anyway)
    sched = one_cycle(n_frozen, [base_lr / 10, base_lr], pct_start=0.99, div=25.0)
    for ep in range(1, n_frozen + 1):
        t = clock()
        model.eval()
        tr = C.train_one_epoch(model, train_dl, opt, criterion, sched)
        r = _record("fastai", "frozen", ep, clock, t, tr, C.evaluate(model, val_dl, criterion), f0)
        records.append(r)
        print(epoch_line("fastai", r, n_frozen), flush=True)

    base_lr /= 2
    for q in body:
        q.requires_grad = True
    sched = one_cycle(n_unfrozen, [base_lr / lr_mult, base_lr], pct_start=0.3, div=5.0)
    for ep in range(1, n_unfrozen + 1):
        t = clock()
        model.train()
        tr = C.train_one_epoch(model, train_dl, opt, criterion, sched)
        r = _record("fastai", "finetune", ep, clock, t, tr, C.evaluate(model, val_dl, criterion), f0)
        records.append(r)
        print(epoch_line("fastai", r, n_unfrozen), flush=True)

    wall = clock()
    del train_dl, val_dl, model, opt, sched
    gc.collect()
    # DataLoader workers (if any) are joined by now; their faults land in RUSAGE_CHILDREN
    return {"records": records, "wall_s": wall, "minflt": C.minor_faults() - f0,
            "minflt_workers": C.minor_faults(resource.RUSAGE_CHILDREN) - w0}


def _limited_data_dir(args, tmp: Path) -> Path:
    """A symlinked copy of DATA with the same train subsample the in-process contenders use."""
    import _classic as C
    from torchvision import datasets

    ds = datasets.ImageFolder(str(args.data / "train"))
    keep = C.limited_indices(ds.targets, args.limit_train, args.seed)
    root = tmp / "data"
    for i in keep:
        src = Path(ds.samples[i][0])
        dst = root / "train" / ds.classes[ds.targets[i]] / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(src)
    (root / "val").symlink_to(args.data / "val", target_is_directory=True)
    return root


def _read_metrics(run: Path) -> tuple[list[dict], dict]:
    metrics, summary = run / "metrics.csv", run / "summary.json"
    missing = [p.name for p in (metrics, summary) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"the run directory {run} has no {' or '.join(missing)}")
    with metrics.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    need = {"phase", "epoch", "val_accuracy", "elapsed_seconds"}
    if rows and not need <= set(rows[0]):
        raise ValueError(f"{metrics} lacks column(s) {sorted(need - set(rows[0]))}; has {list(rows[0])}")
    return rows, json.loads(summary.read_text())


def _num(v) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def measure_forward_floor(args, size: int | None = None) -> dict:
    """The physical floor of a frozen stage: ONE forward pass of the frozen backbone over the train
    and val images (decode + resize included, batch 64), in the precision transferlab extracts in
    (bf16 autocast + channels-last on CPUs with native bf16, else fp32), at `size` px (default: the
    backbone's native size; transferlab's frozen stage is compared with the floor at its own
    eval_size). Timed twice; the second (warm) pass is the floor. A third pass over the batches the
    second one decoded times the network alone (`network_s`): transferlab decodes on threads beside
    the forward pass, so its frozen stage can beat the in-line floor, never the network alone."""
    import dataclasses

    import _classic as C
    import torch
    from torch.utils.data import ConcatDataset, DataLoader, Subset
    from torchvision import datasets

    from transferlab._runtime import cpu_supports_bf16

    model, pp = C.load_backbone(args.backbone, len(C.class_names(args.data)))
    if size is not None:
        pp = dataclasses.replace(pp, size=size)
    model.reset_classifier(0)
    model.eval().to(memory_format=torch.channels_last)
    bf16 = cpu_supports_bf16()
    train = datasets.ImageFolder(str(args.data / "train"), C.val_transform(pp))
    if args.limit_train is not None:  # the same subsample every contender trains on
        train = Subset(train, C.limited_indices(train.targets, args.limit_train, args.seed))
    ds = ConcatDataset([train, datasets.ImageFolder(str(args.data / "val"), C.val_transform(pp))])
    loader = DataLoader(ds, batch_size=64, shuffle=False, num_workers=0)
    times, batches = [], []
    for i in range(2):
        t0 = time.perf_counter()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for x, _y in loader:
                x = x.contiguous(memory_format=torch.channels_last)
                model(x)
                if i == 1:
                    batches.append(x)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for x in batches:
            model(x)
    network = time.perf_counter() - t0
    return {"images": len(ds), "size": pp.size, "precision": "bf16 autocast" if bf16 else "fp32", "cold_s": times[0],
            "floor_s": times[1], "network_s": network, "records": [], "wall_s": sum(times) + network, "minflt": None}


def run_transferlab(args) -> dict:
    """The package's CLI in a subprocess; wall time from the outside, epochs from its metrics.csv."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("COLUMNS", "160")  # rich wraps its log lines at 80 columns when piped
    result: dict = {"records": [], "wall_s": None, "minflt": None, "ok": False}

    # Is there a CLI at all? (A separate tiny process, outside the timing.)
    probe = subprocess.run(
        [sys.executable, "-c",
         "import importlib.util as u, sys; sys.exit(0 if u.find_spec('transferlab.__main__') else 3)"],
        cwd=REPO, env=env, capture_output=True, text=True)
    if probe.returncode != 0:
        why = (probe.stderr.strip().splitlines() or ["transferlab/__main__.py not found"])[-1]
        result["error"] = (f"transferlab CLI not available to {sys.executable}: `python -m transferlab` "
                           f"needs the package installed with src/transferlab/__main__.py ({why})")
        return result

    tmp = Path(tempfile.mkdtemp(prefix="tl-bench-"))
    if args.transferlab_cache == "cold":
        # transferlab keeps backbone features on disk under $TRANSFERLAB_HOME (default ~/.cache/transferlab);
        # earlier runs (tests, other benchmarks) would otherwise hand it features it never paid for.
        env["TRANSFERLAB_HOME"] = str(tmp / "home")
    result["cache"] = args.transferlab_cache
    data = _limited_data_dir(args, tmp) if args.limit_train is not None else args.data
    run = tmp / "run"
    cmd = [sys.executable, "-m", "transferlab", "train", str(data), "--out", str(run), "--seed", str(args.seed),
           *shlex.split(args.transferlab_args)]
    result["cmd"] = shlex.join(cmd)
    print(f"  $ {result['cmd']}" + (f"   (TRANSFERLAB_HOME={env['TRANSFERLAB_HOME']}: cold feature cache)"
                                    if args.transferlab_cache == "cold" else "   (warm feature cache)"), flush=True)
    log_path = args.out / "transferlab_stdout.txt"
    import _classic as C

    C.release_memory()  # this process's retained heap would slow the child's page faults (see _classic)
    tail: deque[str] = deque(maxlen=25)
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt
    t0 = time.perf_counter()
    launched = time.time()  # against summary.json's started_at: the child's start-up
    try:
        with log_path.open("w") as log, subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                bufsize=1) as proc:
            for line in proc.stdout:
                log.write(line)
                tail.append(line.rstrip("\n"))
                print(f"  [transferlab] {line.rstrip()}", flush=True)
            rc = proc.wait()
    except OSError as e:
        result["error"] = f"could not start `{result['cmd']}`: {e}"
        return result
    result["wall_s"] = time.perf_counter() - t0
    result["minflt"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt - c0
    result["returncode"] = rc
    result["stdout_log"] = str(log_path)
    try:
        if rc != 0:
            result["error"] = (f"`transferlab train` exited with code {rc} after {result['wall_s']:.1f}s; "
                               f"last lines of its output:\n    " + "\n    ".join(tail))
            return result
        try:
            rows, summary = _read_metrics(run)
        except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
            result["error"] = f"transferlab finished but its results cannot be read: {e}"
            return result
        accs = [_num(r.get("val_accuracy")) for r in rows]
        scale = 0.01 if any(a is not None and a > 1.0 for a in accs) else 1.0  # tolerate percentages
        for r, a in zip(rows, accs):
            result["records"].append({
                "contender": "transferlab", "phase": r.get("phase"), "epoch": r.get("epoch"),
                "train_loss": _num(r.get("train_loss")), "train_acc": _num(r.get("train_accuracy")),
                "val_loss": _num(r.get("val_loss")), "val_acc": None if a is None else a * scale,
                "lr": _num(r.get("lr")), "epoch_s": _num(r.get("epoch_seconds")),
                "elapsed_s": _num(r.get("elapsed_seconds")),
            })
        result["summary_json"] = summary
        result["metrics_rows"] = rows
        result["internal_s"] = _num(summary.get("total_seconds"))
        if summary.get("started_at"):  # interpreter, imports and CLI parsing before train() began
            started = datetime.fromisoformat(summary["started_at"]).timestamp()
            result["startup_s"] = max(0.0, started - launched)
        if result["internal_s"] is None and result["records"]:
            result["internal_s"] = result["records"][-1]["elapsed_s"]
        result["ok"] = True
        return result
    finally:
        if args.keep_run:
            result["run_dir"] = str(run)
            print(f"  transferlab run kept at {run}", flush=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    import _classic as C

    # Before torch allocates anything big, so the whole run sees the same allocator.
    alloc = C.tune_allocator(args.tune_allocator == "on")

    import torch
    from torchvision import datasets

    cores = C.physical_cores()
    torch.set_num_threads(cores)
    n_val = len(datasets.ImageFolder(str(args.data / "val")).samples)
    n_train = len(datasets.ImageFolder(str(args.data / "train")).samples)

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    print(f"time_to_accuracy: data={args.data} (train {n_train}"
          f"{f', limited to {args.limit_train}' if args.limit_train else ''}, val {n_val}) backbone={args.backbone} "
          f"seed{'s' if len(args.seeds) > 1 else ''}={','.join(map(str, args.seeds))} "
          f"contenders={','.join(args.only)}", flush=True)
    print(f"machine: {cpu}; os.cpu_count()={os.cpu_count()}, physical cores={cores}, "
          f"torch {torch.__version__} threads={torch.get_num_threads()}; DataLoader num_workers={args.num_workers}",
          flush=True)
    print(alloc.line() + " [applies to classic/fastai in this process; transferlab runs in its own process]",
          flush=True)
    machine = {"cpu": cpu, "cpu_count": os.cpu_count(), "physical_cores": cores, "torch": torch.__version__,
               "torch_threads": torch.get_num_threads(), "python": sys.version.split()[0]}

    ratios: dict[int, float] = {}
    for seed in args.seeds:
        args.seed = seed
        ratios[seed] = run_seed(args, C, machine, alloc.line(), n_train, n_val, cores)
    if len(args.seeds) > 1:
        median = statistics.median(ratios.values())
        print("\n== over seeds ==")
        for seed, r in ratios.items():
            print(f"seed {seed}: time_ratio={r:.3f}")
        reached = sum(math.isfinite(r) for r in ratios.values())
        print(f"transferlab reached the classic best in {reached} of {len(ratios)} seeds; "
              f"{sum(r <= 0.1 for r in ratios.values())} within a tenth of its time. Median:")
        print(f"time_ratio={median:.3f}", flush=True)
    return 0


def run_seed(args, C, machine: dict, alloc_line: str, n_train: int, n_val: int, cores: int) -> float:
    """Every contender once, at args.seed; prints the summary and `time_ratio=R`, returns R."""
    # "reached" = at least as many val images right as the classic best; half an image of slack
    # absorbs accuracies that were rounded when written to CSV.
    tol = 0.5 / n_val
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_json = args.out / f"time_to_accuracy_{'-'.join(args.only)}_{stamp}.json"
    doc = {
        "argv": sys.argv, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine, "allocator": alloc_line, "n_train": n_train, "n_val": n_val, "contenders": {},
    }
    if len(args.seeds) > 1:
        print(f"\n######## seed {args.seed} ########", flush=True)

    def save() -> None:
        out_json.write_text(json.dumps(doc, indent=2, default=str))

    classic_best, classic_seconds = args.classic_best, args.classic_seconds
    runners = {"classic": run_classic, "fastai": run_fastai, "transferlab": run_transferlab}
    summary_lines = []
    for name in args.only:
        print(f"\n== {name} ==", flush=True)
        meter = C.LoadMeter()
        res = runners[name](args)
        res["load"] = load = meter.stop()
        recs = res["records"]
        accs = [r["val_acc"] for r in recs if r.get("val_acc") is not None]
        best = max(accs) if accs else None
        if name == "transferlab" and res.get("summary_json"):
            best = _num(res["summary_json"].get("val_accuracy_best")) or best
        if name == "classic":
            if args.classic_best is not None:
                print("  note: --classic-best/--classic-seconds ignored, classic was measured", flush=True)
            classic_best, classic_seconds = best, res["wall_s"]
        reach = first_reach(recs, classic_best, tol)
        res.update(best_val_acc=best, first_reach_classic_best_s=reach, target=classic_best)
        doc["contenders"][name] = res
        save()

        if res.get("error"):
            line = f"[{name}] FAILED: {res['error']}"
        elif name == "transferlab":
            summary = res.get("summary_json") or {}
            # the floor at the resolution transferlab's frozen stage ran at (its eval_size), measured
            # after it, so the two never share the machine
            size = summary.get("eval_size") or summary.get("img_size")
            print("\n== floor: one frozen forward pass ==", flush=True)
            floor = measure_forward_floor(args, size)
            doc["floor"] = floor
            save()
            floor_line = (f"[floor] one frozen forward pass over train+val ({floor['images']} images at {floor['size']} px, "
                          f"decode included, {floor['precision']}, channels-last): {floor['floor_s']:.1f}s warm "
                          f"({floor['cold_s']:.1f}s cold; the network alone on the decoded batches "
                          f"{floor['network_s']:.1f}s)")
            print(floor_line, flush=True)
            summary_lines.append(floor_line)
            internal = res.get("internal_s")
            startup = res.get("startup_s")
            reach_ext = f" ({reach + startup:.1f}s after launch: {startup:.1f}s process start-up)" if (
                reach is not None and startup is not None) else ""
            # wall = start-up + train + what follows it (the report: evaluation, plots, HTML)
            parts = ("external, incl. start-up" if startup is None or internal is None else
                     f"external: start-up {startup:.1f}s + train {internal:.1f}s + "
                     f"report {max(0.0, res['wall_s'] - startup - internal):.1f}s")
            phases = summary.get("phase_seconds") or {}
            frozen = (phases["feature_extraction"] + phases.get("head_training", 0.0)
                      if "feature_extraction" in phases else None)
            frozen_part = "" if frozen is None else (
                f"  frozen_stage_s={frozen:.1f} ({frozen / floor['floor_s']:.2f}x the floor, "
                f"{frozen / floor['network_s']:.2f}x the network alone)")
            sizes = f"  sizes: train {summary.get('img_size')} px, eval {size} px" if size else ""
            line = (f"[{name}] best_val_acc={fmt_acc(best)}  wall_s={res['wall_s']:.1f} ({parts})  "
                    f"internal_s={'?' if internal is None else f'{internal:.1f}'}{frozen_part}  "
                    f"first_reach_classic_best={fmt_s(reach)}{reach_ext}  "
                    f"minflt={res['minflt']} (RUSAGE_CHILDREN delta)  other_cpu_s={load['other_cpu_s']}{sizes}")
        else:
            target = "n/a (no classic figure)" if classic_best is None else fmt_s(reach)
            line = (f"[{name}] best_val_acc={fmt_acc(best)}  wall_s={res['wall_s']:.1f}  "
                    f"first_reach_classic_best={target}  minflt={res['minflt']} (RUSAGE_SELF delta"
                    + (f"; workers {res['minflt_workers']}" if args.num_workers else "")
                    + f")  other_cpu_s={load['other_cpu_s']}")
        print(line, flush=True)
        summary_lines.append(line.split("\n", 1)[0] + (" [its output is above]" if "\n" in line else ""))
        if load["other_cpu_s"] is not None and load["other_cpu_s"] > 0.05 * load["wall_s"] * cores:
            warn = (f"  WARNING: other processes used {load['other_cpu_s']:.0f} CPU-s of the "
                    f"{load['wall_s'] * cores:.0f} available during {name} (load avg {load['loadavg1_start']:.1f}"
                    f" -> {load['loadavg1_end']:.1f}); its timings are inflated")
            print(warn, flush=True)
            summary_lines.append(warn)

    print(f"\n== summary{f' (seed {args.seed})' if len(args.seeds) > 1 else ''} ==", flush=True)
    if classic_best is not None:
        src = "measured" if "classic" in args.only else "given"
        print(f"classic best val accuracy {classic_best:.4f} in {classic_seconds:.1f}s ({src}); "
              f"'reached' = val_acc >= {classic_best:.4f} - {tol:.4f} (half of one of {n_val} val images)")
    for line in summary_lines:
        print(line)
    print(f"results: {out_json}", flush=True)

    tl = doc["contenders"].get("transferlab")
    reach = tl.get("first_reach_classic_best_s") if tl else None
    if tl is None:
        print("note: transferlab was not run; time_ratio=inf stands for 'not measured'")
    elif reach is None and not tl.get("error"):
        print("note: transferlab never reached the classic best val accuracy")
    ratio = math.inf if reach is None or not classic_seconds else reach / classic_seconds
    print(f"time_ratio={ratio:.3f}" if math.isfinite(ratio) else "time_ratio=inf", flush=True)
    return ratio


if __name__ == "__main__":
    sys.exit(main())
