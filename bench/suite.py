"""The benchmark suite: transferlab vs. a linear probe, fastai-style fine_tune and (opt-in) the classic
loop, on every dataset of ../shared/data/suite/ plus ants/bees, reporting TEST accuracy (issue 19).

Datasets, one after another on the same machine and backbone: sign_digits, scene15, brain_tumor_mri,
potato_leaf (each <name>/{train,val,test}/<class>/<file>) and ants_bees (hymenoptera_data: train/ and
val/ only, so its val/ is reported as its "test", and the output says so). Contenders:

  probe         logistic regression on frozen features (extracted once at the backbone's eval size, 288 px
                for Lite0, bf16 autocast + channels-last where the CPU has native bf16; standardised;
                C chosen on val from 0.01..100). Wall seconds include the model load and the extraction.
  fastai-style  bench/time_to_accuracy.py's fastai schedule (1 frozen + N unfrozen one-cycle epochs, base
                lr 2e-3, body /100), plain PyTorch via bench/_classic.py.
  classic       (--with-classic) 16 frozen epochs re-running the backbone + 8 fine-tuning epochs, Adam,
                discriminative lrs 1e-4 / 3^depth (depth 0 = head + conv_head, then blocks from the top).
  transferlab   `python -m transferlab train DATA --out RUN --seed S` in a subprocess with a cold feature
                cache, then `python -m transferlab evaluate RUN DATA --split test`.

fastai-style and classic evaluate val AND test after every epoch; the test pass is outside their clock.
The model "chosen on val" is the epoch with the best val accuracy (ties: lower val loss); its test
accuracy is the contender's. The last line printed is

  suite: datasets_won=W/N worst_delta=±x.x time_ratio_geomean=R time_ratio_max=M

(won: transferlab's seed-mean test accuracy >= the best other contender's - 0.5 points; delta in points;
time ratio = transferlab wall s / fastai-style wall s per dataset).

    .venv/bin/python bench/suite.py                                          # everything, seed 0
    .venv/bin/python bench/suite.py --seeds 0,1,2 --with-classic             # the full protocol
    .venv/bin/python bench/suite.py --datasets scene15,ants_bees --contenders probe,transferlab
    .venv/bin/python bench/suite.py --datasets sign_digits --limit-train 30 --limit-eval 40 --fastai-epochs 1 \\
        --seeds 0 --out /tmp/suite-smoke                                     # smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # works as a script and as `python -m bench.…`

import time_to_accuracy as TTA  # noqa: E402  (its argument glue, metrics reader and fastai schedule notes)

SUITE = REPO / "../shared/data/suite"
ANTS_BEES = REPO / "../shared/data/hymenoptera_data"
DATASETS = ("sign_digits", "scene15", "brain_tumor_mri", "potato_leaf", "ants_bees")
CONTENDERS = ("probe", "fastai-style", "classic", "transferlab")  # run in this order
PROBE_CS = (0.01, 0.1, 1.0, 10.0, 100.0)
README_BEGIN, README_END = "<!-- suite:begin -->", "<!-- suite:end -->"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="transferlab vs. probe / fastai-style / classic on the benchmark suite "
                                            "(test accuracy, wall seconds).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated subset of " + ",".join(DATASETS))
    p.add_argument("--contenders", default="probe,fastai-style,transferlab",
                   help="comma-separated subset of " + ",".join(CONTENDERS))
    p.add_argument("--with-classic", action="store_true", help="also run the classic contender")
    p.add_argument("--backbone", default="efficientnet_lite0",
                   choices=["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
    p.add_argument("--seeds", default="0", help="comma-separated seeds; everything runs once per seed")
    p.add_argument("--fastai-epochs", type=int, default=5, help="fastai-style unfrozen epochs")
    p.add_argument("--classic-frozen-epochs", type=int, default=16)
    p.add_argument("--classic-finetune-epochs", type=int, default=8)
    p.add_argument("--transferlab-args", default="", help='extra `transferlab train` arguments, one string')
    p.add_argument("--limit-train", type=int, default=None, metavar="N",
                   help="stratified subsample of N train images (smoke tests; all contenders)")
    p.add_argument("--limit-eval", type=int, default=None, metavar="N",
                   help="stratified subsample of N val and N test images (smoke tests only)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="results folder (default: bench/results/)")
    p.add_argument("--readme", type=Path, default=None, metavar="README",
                   help="also write the short Benchmarks table between the suite markers of this file "
                        f"({README_BEGIN} ... {README_END})")
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, a in enumerate(argv[:-1]):  # a value starting with "-": glue it, --transferlab-args="--x y"
        if a == "--transferlab-args":
            argv[i:i + 2] = [f"{a}={argv[i + 1]}"]
            break
    args = p.parse_args(argv)
    args.out = (args.out if args.out is not None else REPO / "bench/results").resolve()
    args.datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    chosen = {c.strip() for c in args.contenders.split(",") if c.strip()} | ({"classic"} if args.with_classic else set())
    bad = sorted(set(args.datasets) - set(DATASETS)) + sorted(chosen - set(CONTENDERS))
    if bad or not args.datasets or not chosen:
        p.error(f"unknown dataset(s)/contender(s) {bad}")
    args.contenders = [c for c in CONTENDERS if c in chosen]
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    return args


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def dataset_root(name: str) -> tuple[Path, str]:
    """(root, the split reported as test): ants/bees has no test/, its val/ stands in."""
    root = (ANTS_BEES if name == "ants_bees" else SUITE / name).resolve()
    return root, ("test" if (root / "test").is_dir() else "val")


def prepared_data(args, root: Path, seed: int, tmp: Path) -> Path:
    """DATA itself, or a symlinked copy with stratified train (and, with --limit-eval, val/test) subsamples."""
    if args.limit_train is None and args.limit_eval is None:
        return root
    import _classic as C
    from torchvision import datasets

    out = tmp / "data"
    for split in ("train", "val", "test"):
        if not (root / split).is_dir():
            continue
        limit = args.limit_train if split == "train" else args.limit_eval
        if limit is None:
            (out / split).parent.mkdir(parents=True, exist_ok=True)
            (out / split).symlink_to(root / split, target_is_directory=True)
            continue
        ds = datasets.ImageFolder(str(root / split))
        for i in C.limited_indices(ds.targets, limit, seed):
            src = Path(ds.samples[i][0])
            dst = out / split / ds.classes[ds.targets[i]] / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(src)
    return out


class PausableClock:
    """Seconds since start, minus the time spent inside `with clock.paused():` (the test evaluations)."""

    def __init__(self) -> None:
        self.t0, self.excluded = time.perf_counter(), 0.0

    def __call__(self) -> float:
        return time.perf_counter() - self.t0 - self.excluded

    def paused(self):
        clock = self

        class _Pause:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                clock.excluded += time.perf_counter() - self.t

        return _Pause()


def _predict(model, loader, criterion) -> dict:
    import torch
    from sklearn.metrics import balanced_accuracy_score

    was = model.training
    model.eval()
    loss, preds, ys = 0.0, [], []
    with torch.no_grad():
        for x, y in loader:
            out = model(x)
            loss += criterion(out, y).item() * x.size(0)
            preds.append(out.argmax(1))
            ys.append(y)
    model.train(was)
    pred, y = torch.cat(preds).numpy(), torch.cat(ys).numpy()
    return {"loss": loss / max(len(y), 1), "acc": float((pred == y).mean()),
            "bal_acc": float(balanced_accuracy_score(y, pred)), "n": int(len(y))}


def chosen_on_val(records: list[dict]) -> dict:
    return max(records, key=lambda r: (r["val_acc"], -r["val_loss"]))


# --------------------------------------------------------------------------------------------------
# Contenders
# --------------------------------------------------------------------------------------------------


def run_probe(args, data: Path, test_split: str, seed: int) -> dict:
    import _classic as C
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, log_loss
    from sklearn.preprocessing import StandardScaler
    from torch.utils.data import DataLoader
    from torchvision import datasets

    from transferlab._runtime import cpu_supports_bf16
    from transferlab.models.offline import SHIPPED

    clock = PausableClock()
    C.seed_everything(seed)
    model, pp = C.load_backbone(args.backbone, len(C.class_names(data)))
    pp.size = SHIPPED[args.backbone].test_size or pp.size  # the size transferlab evaluates at (288 for Lite0)
    model.reset_classifier(0)
    model.eval().to(memory_format=torch.channels_last)
    bf16 = cpu_supports_bf16()

    def features(split: str):
        ds = datasets.ImageFolder(str(data / split), C.val_transform(pp))
        feats, ys = [], []
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for x, y in DataLoader(ds, batch_size=64, shuffle=False, num_workers=args.num_workers):
                feats.append(model(x.contiguous(memory_format=torch.channels_last)).float())
                ys.append(y)
        when = "untimed" if split == test_split != "val" else f"elapsed={clock():.1f}s"
        print(f"  probe    features {split}: {len(ds)} images at {pp.size} px, {when}", flush=True)
        return torch.cat(feats).numpy(), torch.cat(ys).numpy()

    t_load = clock()
    (xtr, ytr), (xva, yva) = features("train"), features("val")
    t_feat = clock()
    t = time.perf_counter()
    with clock.paused():
        xte, yte = (xva, yva) if test_split == "val" else features(test_split)
    test_eval_s = time.perf_counter() - t
    scaler = StandardScaler().fit(xtr)
    xtr, xva, xte = scaler.transform(xtr), scaler.transform(xva), scaler.transform(xte)
    grid = []
    for c in PROBE_CS:
        lr = LogisticRegression(C=c, max_iter=2000).fit(xtr, ytr)
        pva = lr.predict_proba(xva)
        acc = float((lr.classes_[pva.argmax(1)] == yva).mean())
        grid.append({"C": c, "val_acc": acc, "val_loss": float(log_loss(yva, pva, labels=lr.classes_)), "lr": lr})
        print(f"  probe    C={c:<6g} val_acc={acc:.4f} elapsed={clock():.1f}s", flush=True)
    best = max(grid, key=lambda g: (g["val_acc"], -g["val_loss"]))
    wall = clock()
    with clock.paused():
        pred = best["lr"].predict(xte)
    rec = {"phase": "probe", "epoch": 1, "val_acc": best["val_acc"], "val_loss": best["val_loss"],
           "test_acc": float((pred == yte).mean()), "test_bal_acc": float(balanced_accuracy_score(yte, pred)),
           "elapsed_s": wall}
    for g in grid:
        del g["lr"]
    del model
    return {"records": [rec], "chosen": rec, "wall_s": wall, "test_eval_s": test_eval_s, "curve": False,
            "phase_seconds": {"load": t_load, "features": t_feat - t_load, "fit": wall - t_feat}, "C_grid": grid, "C": best["C"], "eval_size": pp.size,
            "precision": "bf16 autocast" if bf16 else "fp32", "n_train": len(ytr)}


def _epoch_loop(args, name: str, data: Path, test_split: str, seed: int, stages) -> dict:
    """Shared by fastai-style and classic: `stages(model, train_dl)` yields (phase, n_epochs, setup) where
    setup() prepares the model/optimizer and returns a step function doing one training epoch."""
    import _classic as C
    import torch
    from torch import nn
    from torch.utils.data import DataLoader
    from torchvision import datasets

    clock = PausableClock()
    g = C.seed_everything(seed)
    model, pp = C.load_backbone(args.backbone, len(C.class_names(data)))
    # fastai drops the last partial batch; not when that would leave no batch at all (tiny smoke tests)
    n_train = sum(1 for f in (data / "train").rglob("*") if f.is_file())
    train_dl, val_dl, classes = C.make_loaders(data, pp, batch_size=args.batch_size, num_workers=args.num_workers,
                                               generator=g, limit_train=None, seed=seed,
                                               drop_last=name == "fastai-style" and n_train >= args.batch_size)
    test_ds = datasets.ImageFolder(str(data / test_split), C.val_transform(pp))
    if test_ds.classes != classes:
        raise RuntimeError(f"{test_split} classes {test_ds.classes} != train classes {classes}")
    test_dl = val_dl if test_split == "val" else DataLoader(test_ds, batch_size=args.batch_size, shuffle=False)
    criterion = nn.CrossEntropyLoss()
    records, phase_s, test_eval_s = [], {}, 0.0
    for phase, n_epochs, setup in stages(model, train_dl):
        t_phase = clock()
        step = setup()
        for ep in range(1, n_epochs + 1):
            t = clock()
            tr = step()
            vl, va, _, _ = C.evaluate(model, val_dl, criterion)
            elapsed = clock()
            t0 = time.perf_counter()
            with clock.paused():
                te = _predict(model, test_dl, criterion)
            test_eval_s += time.perf_counter() - t0
            r = {"phase": phase, "epoch": ep, "train_loss": tr[0], "val_loss": vl, "val_acc": va,
                 "test_acc": te["acc"], "test_bal_acc": te["bal_acc"], "epoch_s": elapsed - t, "elapsed_s": elapsed}
            records.append(r)
            print(f"  {name:<12} {phase:<8} {ep:>2}/{n_epochs:<2} train_loss={tr[0]:.4f} val_acc={va:.4f} "
                  f"test_acc={te['acc']:.4f} epoch={r['epoch_s']:.1f}s elapsed={elapsed:.1f}s", flush=True)
        phase_s[phase] = clock() - t_phase
    wall = clock()
    del train_dl, val_dl, test_dl, model
    gc.collect()
    return {"records": records, "chosen": chosen_on_val(records), "wall_s": wall, "test_eval_s": test_eval_s,
            "curve": True, "phase_seconds": phase_s}


def run_fastai_style(args, data, test_split, seed) -> dict:
    """The schedule of time_to_accuracy.run_fastai (see its docstring), with a test pass per epoch."""
    import torch
    from torch.optim.lr_scheduler import OneCycleLR

    def stages(model, train_dl):
        head = list(model.classifier.parameters())
        head_ids = {id(h) for h in head}
        body = [q for q in model.parameters() if id(q) not in head_ids]
        opt = torch.optim.AdamW([{"params": body}, {"params": head}], lr=1e-3, betas=(0.9, 0.99), eps=1e-5,
                                weight_decay=0.01)
        crit = torch.nn.CrossEntropyLoss()
        import _classic as C

        def one_cycle(epochs, lrs, pct_start, div):
            return OneCycleLR(opt, max_lr=lrs, total_steps=max(1, epochs * len(train_dl)), pct_start=pct_start,
                              anneal_strategy="cos", div_factor=div, final_div_factor=1e5 / div,
                              cycle_momentum=True, base_momentum=0.85, max_momentum=0.95)

        def frozen():
            for q in body:
                q.requires_grad = False
            sched = one_cycle(1, [2e-4, 2e-3], 0.99, 25.0)
            return lambda: (model.eval(), C.train_one_epoch(model, train_dl, opt, crit, sched))[1]

        def unfrozen():
            for q in body:
                q.requires_grad = True
            sched = one_cycle(args.fastai_epochs, [1e-3 / 100, 1e-3], 0.3, 5.0)
            return lambda: (model.train(), C.train_one_epoch(model, train_dl, opt, crit, sched))[1]

        yield "frozen", 1, frozen
        yield "finetune", args.fastai_epochs, unfrozen

    return _epoch_loop(args, "fastai-style", data, test_split, seed, stages)


def run_classic(args, data, test_split, seed) -> dict:
    """time_to_accuracy.run_classic, with discriminative fine-tuning lrs 1e-4 / 3^depth from the top."""
    import _classic as C
    import torch

    def stages(model, train_dl):
        crit = torch.nn.CrossEntropyLoss()

        def frozen():
            for q in model.parameters():
                q.requires_grad = False
            for q in model.classifier.parameters():
                q.requires_grad = True
            opt = torch.optim.Adam(model.classifier.parameters(), lr=1e-3)
            return lambda: (model.eval(), C.train_one_epoch(model, train_dl, opt, crit))[1]

        def finetune():
            # depth 0: head + conv_head/bn2; then the stages of model.blocks from the top; the stem last
            groups = [list(model.classifier.parameters()) + list(model.conv_head.parameters())
                      + list(model.bn2.parameters())]
            groups += [list(b.parameters()) for b in reversed(model.blocks)]
            groups.append(list(model.conv_stem.parameters()) + list(model.bn1.parameters()))
            for q in model.parameters():
                q.requires_grad = True
            opt = torch.optim.Adam([{"params": g, "lr": 1e-4 / 3 ** d} for d, g in enumerate(groups)])
            return lambda: (model.train(), C.train_one_epoch(model, train_dl, opt, crit))[1]

        yield "frozen", args.classic_frozen_epochs, frozen
        yield "finetune", args.classic_finetune_epochs, finetune

    return _epoch_loop(args, "classic", data, test_split, seed, stages)


def run_transferlab(args, data, test_split, seed) -> dict:
    import _classic as C

    tmp = Path(tempfile.mkdtemp(prefix="tl-suite-"))
    env = dict(os.environ, PYTHONUNBUFFERED="1", TRANSFERLAB_HOME=str(tmp / "home"))  # cold feature cache
    env.setdefault("COLUMNS", "160")
    run = tmp / "run"

    def call(cmd: list[str]) -> tuple[int, float, list[str]]:
        print(f"  $ {shlex.join(cmd)}", flush=True)
        t0, tail = time.perf_counter(), []
        with subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, bufsize=1) as proc:
            for line in proc.stdout:
                tail = (tail + [line.rstrip()])[-20:]
                print(f"  [transferlab] {line.rstrip()}", flush=True)
            rc = proc.wait()
        return rc, time.perf_counter() - t0, tail

    try:
        C.release_memory()  # this process's retained heap slows the child (see _classic.release_memory)
        train = [sys.executable, "-m", "transferlab", "train", str(data), "--out", str(run), "--seed", str(seed),
                 *shlex.split(args.transferlab_args)]
        rc, wall, tail = call(train)
        if rc != 0:
            raise RuntimeError(f"`transferlab train` exited {rc} after {wall:.1f}s:\n    " + "\n    ".join(tail))
        rows, summary = TTA._read_metrics(run)
        before = set(run.glob("eval-*.json"))
        rc, eval_s, tail = call([sys.executable, "-m", "transferlab", "evaluate", str(run), str(data),
                                 "--split", test_split, "--no-progress"])
        if rc != 0:
            raise RuntimeError(f"`transferlab evaluate` exited {rc}:\n    " + "\n    ".join(tail))
        evals = sorted(run.glob("eval-*.json"), key=lambda p: (p not in before, p.stat().st_mtime))
        ev = json.loads(evals[-1].read_text())
        m = ev["metrics"]
        best = summary.get("best") or {}
        val_acc = TTA._num(summary.get("val_accuracy_best"))
        rec = {"phase": best.get("phase"), "epoch": best.get("epoch"), "val_acc": val_acc,
               "val_loss": TTA._num(best.get("val_loss")), "test_acc": float(m["accuracy"]),
               "test_bal_acc": TTA._num(m.get("balanced_accuracy")), "elapsed_s": wall}
        epochs = [{"phase": r.get("phase"), "epoch": r.get("epoch"), "val_acc": TTA._num(r.get("val_accuracy")),
                   "elapsed_s": TTA._num(r.get("elapsed_seconds"))} for r in rows]
        return {"records": [rec], "chosen": rec, "wall_s": wall, "test_eval_s": eval_s, "curve": False,
                "phase_seconds": summary.get("phase_seconds"), "epochs": epochs, "eval_json": ev.get("name"),
                "finetune": summary.get("finetune"), "summary_json": summary, "cmd": shlex.join(train)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


RUNNERS = {"probe": run_probe, "fastai-style": run_fastai_style, "classic": run_classic,
           "transferlab": run_transferlab}


# --------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------


def discarded_seconds(summary: dict) -> float | None:
    """Seconds of fine-tuning transferlab threw away (summary.json: finetune.discarded_seconds), if written."""
    ft = summary.get("finetune")
    v = ft.get("discarded_seconds") if isinstance(ft, dict) else summary.get("finetune_discarded_seconds")
    return TTA._num(v)


def first_reach(res: dict, target: float, tol: float) -> float | None:
    """Seconds until `res` first reached test accuracy `target` (curve: per epoch; else its end time)."""
    pts = res["records"] if res["curve"] else [res["chosen"]]
    return next((r["elapsed_s"] for r in pts if r["test_acc"] >= target - tol), None)


def mean_spread(xs: list[float]) -> tuple[float | None, float | None, float | None]:
    return (statistics.fmean(xs), min(xs), max(xs)) if xs else (None, None, None)


def fmt_ms(xs: list[float], scale: float = 100.0, d: int = 1) -> str:
    m, lo, hi = mean_spread(xs)
    if m is None:
        return "failed"
    return f"{m * scale:.{d}f}" + (f" ({lo * scale:.{d}f}–{hi * scale:.{d}f})" if len(xs) > 1 else "")


def plot_dataset(path: Path, name: str, per_seed: dict, test_label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (seed, results) in enumerate(per_seed.items()):
        for j, (c, res) in enumerate(results.items()):
            if "error" in res:
                continue
            color, label = f"C{CONTENDERS.index(c)}", c if i == 0 else None
            if res["curve"]:
                ax.plot([r["elapsed_s"] for r in res["records"]], [100 * r["test_acc"] for r in res["records"]],
                        "-o", ms=3, color=color, label=label, alpha=0.8)
            ax.plot([res["wall_s"]], [100 * res["chosen"]["test_acc"]], "*", ms=12, color=color,
                    label=None if res["curve"] else label)
    ax.set(xlabel="wall seconds", ylabel=f"{test_label} accuracy (%)",
           title=f"{name}: {test_label} accuracy vs. time (star: model chosen on val)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def short_table(doc: dict, args) -> str:
    """One row per dataset: each contender's test accuracy (seed mean) and wall seconds, and the ratio."""
    cs = [c for c in args.contenders]
    head = ("| dataset | " + " | ".join(f"{c} test %" for c in cs) + " | " + " | ".join(f"{c} s" for c in cs)
            + " | transferlab / fastai-style time |")
    rows = [head, "|" + "---|" * (2 * len(cs) + 2)]
    for name, d in doc["datasets"].items():
        def mean(c, key):
            xs = [s[c]["chosen"][key] if key in s[c]["chosen"] else s[c][key] for s in d["seeds"].values()
                  if c in s and "error" not in s[c]]
            xs = [x for x in xs if x is not None]
            return statistics.fmean(xs) if xs else None
        acc = {c: mean(c, "test_acc") for c in cs}
        wall = {c: mean(c, "wall_s") for c in cs}
        best = max((a for a in acc.values() if a is not None), default=None)
        cells = [("failed" if a is None else (f"**{100 * a:.1f}**" if a == best else f"{100 * a:.1f}")) for a in acc.values()]
        ratio = (wall.get("transferlab") / wall["fastai-style"]
                 if wall.get("transferlab") and wall.get("fastai-style") else None)
        tag = "" if d["test_split"] == "test" else " (val)"
        rows.append(f"| {name}{tag} | " + " | ".join(cells) + " | "
                    + " | ".join("" if w is None else f"{w:.0f}" for w in wall.values())
                    + f" | {'' if ratio is None else f'{ratio:.2f}'} |")
    return "\n".join(rows)


def write_readme_table(path: Path, table: str, machine: dict, args) -> None:
    """Replace what lies between README_BEGIN and README_END in `path` (both must be there)."""
    text = path.read_text()
    if README_BEGIN not in text or README_END not in text:
        print(f"  --readme: {path} has no {README_BEGIN} / {README_END} markers; not written", flush=True)
        return
    seeds = ",".join(map(str, args.seeds))
    block = (f"{README_BEGIN}\n{machine['cpu']}, {machine['physical_cores']} cores, torch {machine['torch']}, "
             f"{machine['date'][:10]}; {args.backbone}, seed(s) {seeds}; test accuracy of the model chosen on val, "
             f"wall seconds of the whole run (start-up, data check and report included).\n\n{table}\n{README_END}")
    start, end = text.index(README_BEGIN), text.index(README_END) + len(README_END)
    path.write_text(text[:start] + block + text[end:])
    print(f"  README table written to {path}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    import _classic as C

    C.tune_allocator(True)
    import torch

    cores = C.physical_cores()
    torch.set_num_threads(cores)
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    machine = {"cpu": cpu, "cpu_count": os.cpu_count(), "physical_cores": cores, "torch": torch.__version__,
               "torch_threads": torch.get_num_threads(), "python": sys.version.split()[0],
               "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    print(f"suite: datasets={','.join(args.datasets)} contenders={','.join(args.contenders)} seeds="
          f"{','.join(map(str, args.seeds))} backbone={args.backbone}\nmachine: {cpu}, {cores} physical cores, "
          f"torch {torch.__version__} threads={torch.get_num_threads()}", flush=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_json = args.out / f"suite_{stamp}.json"
    doc = {"argv": sys.argv, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "machine": machine, "datasets": {}}

    for name in args.datasets:
        root, test_split = dataset_root(name)
        test_label = "test" if test_split == "test" else "val (as test)"
        per_seed: dict[int, dict] = {}
        doc["datasets"][name] = {"root": str(root), "test_split": test_split, "seeds": per_seed}
        if not (root / "train").is_dir():
            print(f"\n#### {name}: {root} has no train/ folder; skipped", flush=True)
            per_seed.update({s: {c: {"error": f"no dataset at {root}"} for c in args.contenders} for s in args.seeds})
            continue
        if test_split == "val":
            print(f"\n#### {name}: no test/ split, its val/ is reported as test", flush=True)
        for seed in args.seeds:
            tmp = Path(tempfile.mkdtemp(prefix="suite-data-"))
            data = prepared_data(args, root, seed, tmp)
            per_seed[seed] = results = {}
            for c in args.contenders:
                print(f"\n== {name} / {c} / seed {seed} ==", flush=True)
                try:
                    results[c] = RUNNERS[c](args, data, test_split, seed)
                    ch = results[c]["chosen"]
                    print(f"  [{c}] {test_label}_acc={ch['test_acc']:.4f} val_acc={ch['val_acc']:.4f} "
                          f"wall_s={results[c]['wall_s']:.1f}", flush=True)
                except Exception as e:  # record, keep going
                    results[c] = {"error": f"{type(e).__name__}: {e}"}
                    print(f"  [{c}] FAILED: {results[c]['error']}", flush=True)
                C.release_memory()
                out_json.write_text(json.dumps(doc, indent=2, default=str))
            n_test = sum(1 for f in (data / test_split).rglob("*") if f.is_file())
            ok = {c: r for c, r in results.items() if "error" not in r}
            for c, r in ok.items():  # time at which c first reached each other contender's test accuracy
                r["first_reach_s"] = {o: first_reach(r, ro["chosen"]["test_acc"], 0.5 / max(n_test, 1))
                                      for o, ro in ok.items() if o != c}
                print(f"  [{c}] first reached: " + ", ".join(
                    f"{o} ({100 * ok[o]['chosen']['test_acc']:.1f}%) at {TTA.fmt_s(t)}"
                    for o, t in r["first_reach_s"].items()), flush=True)
            shutil.rmtree(tmp, ignore_errors=True)
        plot_dataset(args.out / f"suite_{stamp}_{name}.png", name, per_seed, test_label)
        out_json.write_text(json.dumps(doc, indent=2, default=str))

    # ---- table and verdicts over seeds
    lines = ["| dataset | contender | test acc % | balanced test acc % | val acc % | wall s | tl/fastai time |",
             "|---|---|---|---|---|---|---|"]
    verdicts, won, deltas, ratios = [], 0, [], []
    for name, d in doc["datasets"].items():
        def vals(c, key):
            rs = [s[c] for s in d["seeds"].values() if c in s and "error" not in s[c]]
            xs = [r["chosen"][key] if key in r["chosen"] else r[key] for r in rs]
            return [x for x in xs if x is not None]
        means = {c: mean_spread(vals(c, "test_acc"))[0] for c in args.contenders}
        tl_w, fa_w = mean_spread(vals("transferlab", "wall_s"))[0], mean_spread(vals("fastai-style", "wall_s"))[0]
        ratio = tl_w / fa_w if tl_w and fa_w else None
        tag = "" if d["test_split"] == "test" else " (val as test)"
        for c in args.contenders:
            errs = [s[c]["error"] for s in d["seeds"].values() if "error" in s.get(c, {})]
            lines.append(f"| {name}{tag} | {c} | {fmt_ms(vals(c, 'test_acc'))}{' ERR' if errs else ''} | "
                         f"{fmt_ms(vals(c, 'test_bal_acc'))} | {fmt_ms(vals(c, 'val_acc'))} | {fmt_ms(vals(c, 'wall_s'), 1.0, 0)} | "
                         f"{f'{ratio:.2f}' if ratio and c == 'transferlab' else ''} |")
        others = {c: m for c, m in means.items() if c != "transferlab" and m is not None}
        tl = means.get("transferlab")
        if ratio:
            ratios.append(ratio)
        if tl is None:
            verdicts.append(f"{name}: transferlab failed or not run -> not won")
            continue
        best_c = max(others, key=others.get) if others else None
        delta = 100 * (tl - others[best_c]) if best_c else 0.0
        won += delta >= -0.5
        deltas.append(delta)
        v = f"{name}: transferlab {100 * tl:.1f} vs best other {best_c} {delta:+.1f} pt -> " + \
            ("won" if delta >= -0.5 else "lost")
        probe = others.get("probe")
        if probe is not None:
            beaters = [c for c, m in others.items() if c != "probe" and m - probe >= 0.01]
            v += (f"; transferlab beats the probe by >=1 pt ({100 * (tl - probe):+.1f})" if tl - probe >= 0.01 else
                  f"; transferlab does NOT beat the probe by >=1 pt ({100 * (tl - probe):+.1f}) where "
                  f"{','.join(beaters)} does" if beaters else
                  f"; no contender beats the probe by >=1 pt (transferlab {100 * (tl - probe):+.1f}): criterion moot")
        disc = [discarded_seconds(s["transferlab"]["summary_json"]) for s in d["seeds"].values()
                if "summary_json" in s.get("transferlab", {})]
        if disc and all(x is not None for x in disc):
            frac = statistics.fmean(x / s["transferlab"]["wall_s"] for x, s in zip(disc, d["seeds"].values()))
            v += f"; discarded fine-tuning {100 * frac:.0f}% of its wall time"
        verdicts.append(v)

    table = "\n".join(lines)
    if args.readme is not None:
        write_readme_table(args.readme, short_table(doc, args), machine, args)
    md = args.out / f"suite_{stamp}.md"
    md.write_text(f"# suite {stamp}\n\n{machine}\n\n{table}\n\n" + "\n".join(f"- {v}" for v in verdicts) + "\n")
    doc["verdicts"] = verdicts
    out_json.write_text(json.dumps(doc, indent=2, default=str))
    print("\n" + table + "\n\n" + "\n".join(verdicts) + f"\nresults: {out_json}, {md}, plots suite_{stamp}_*.png")
    geo = math.exp(statistics.fmean(map(math.log, ratios))) if ratios else float("nan")
    worst = f"{min(deltas):+.1f}" if deltas else "nan"
    print(f"suite: datasets_won={won}/{len(doc['datasets'])} worst_delta={worst} "
          f"time_ratio_geomean={geo:.2f} time_ratio_max={max(ratios) if ratios else float('nan'):.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
