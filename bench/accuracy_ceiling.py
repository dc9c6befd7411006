"""How many val images can transferlab's default backbone get right on this data? (issue: Speed)

`time_to_accuracy.py` at its default seed asks transferlab for the classic loop's best val accuracy,
which on ants/bees is one draw of a noisy maximum (148/153 at seed 0; 145, 145, 147, 147 at seeds
1-4). This bench measures, on transferlab's own frozen features and without looking at any timing,
what the levers a user could turn reach, over several head seeds:

  heads      transferlab's head stage (`train_head`, the TrainConfig defaults: 16 epochs, AdamW 1e-3,
             weight decay, label smoothing), linear and MLP, trained on the train features with or
             without their mirror images; evaluated plain and with flip test-time augmentation
             (softmax averaged over the image and its mirror). Per seed: correct val images at the
             best epoch (the one transferlab keeps: chosen on val, so biased upward) and at the last.
  always     the val images that every plain linear head gets wrong.
  wise       fine-tuned models from `transferlab.train` (two-stage, K fine-tuning epochs, no gate),
             and the weight-space interpolation between the head-only model and each (WiSE-FT,
             Wortsman et al. 2022: theta = (1 - a) theta_head + a theta_finetuned), evaluated in fp32.

    .venv/bin/python bench/accuracy_ceiling.py                            # ants/bees, 288 px, 8 seeds, K = 1,2,3
    .venv/bin/python bench/accuracy_ceiling.py --sizes 288,320 --seeds 4 --finetune-epochs ""
    .venv/bin/python bench/accuracy_ceiling.py --limit 16 --seeds 2 --finetune-epochs 1    # smoke, ~1 minute

Its last line is `best_epoch_mean=X last_epoch_mean=Y n_val=N`: the highest mean over seeds of the
best-epoch count (chosen on val, like the classic loop's best) and of the last-epoch count (chosen by nobody),
each over every head configuration measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from transferlab import _runtime
from transferlab.config import TrainConfig
from transferlab.training.feature_cache import extract_features
from transferlab.data.images import load_image
from transferlab.data.sources import load_splits
from transferlab.data.transforms import eval_transform
from transferlab.io import load_tensors
from transferlab.models.heads import HEADS, HeadConfig, build_classifier
from transferlab.models.param_groups import freeze_backbone
from transferlab.models.registry import resolve_backbone
from transferlab.training.head_stage import selection_score, train_head

REPO = Path(__file__).resolve().parents[1]
WISE_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "hymenoptera_data")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--sizes", default="", help="comma-separated feature resolutions (default: transferlab's eval size)")
    p.add_argument("--seeds", type=int, default=8, help="head seeds 0..N-1")
    p.add_argument("--finetune-epochs", default="1,2,3",
                   help="comma-separated K: one transferlab.train per K for the interpolation (\"\" skips it)")
    p.add_argument("--limit", type=int, default=None, help="first N images of each split (smoke runs)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    return p.parse_args(argv)


def _limited(splits, limit: int | None):
    if limit is None:
        return splits
    return replace(splits, train=splits.train[:limit] + splits.train[-limit:], val=splits.val[:limit] + splits.val[-limit:])


def frozen_features(spec, splits, size: int) -> dict[str, torch.Tensor]:
    """Train and val features at `size`, plain and mirrored, as transferlab extracts them (bf16 where native)."""
    pre = spec.preprocessing.with_size(size)
    model = build_classifier(replace(spec, preprocessing=pre), len(splits.classes), HeadConfig())
    freeze_backbone(model)
    plain = eval_transform(pre)
    views = {"plain": plain, "mirror": lambda im: TF.horizontal_flip(plain(im))}
    autocast = torch.bfloat16 if _runtime.cpu_supports_bf16() else None
    out = {}
    for split in ("train", "val"):
        samples = getattr(splits, split)
        out[f"{split}_y"] = torch.tensor([s.label for s in samples])
        for name, transform in views.items():
            out[f"{split}_{name}"] = extract_features(model, samples, transform, autocast_dtype=autocast)
    return out


def head_counts(f: dict[str, torch.Tensor], kind: str, mirrored_train: bool, seed: int, cfg: TrainConfig):
    """(best-epoch correct, last-epoch correct, best-epoch correct with flip TTA, last with TTA,
    per-image right at the best plain epoch) for one head seed."""
    x, y = f["train_plain"], f["train_y"]
    if mirrored_train:
        x, y = torch.cat([x, f["train_mirror"]]), y.repeat(2)
    torch.manual_seed(seed)
    head = HEADS[kind](x.shape[1], int(f["train_y"].max()) + 1, HeadConfig(kind=kind))
    epochs = []

    def on_epoch(rec: dict) -> None:
        head.eval()
        with torch.no_grad():
            p, q = head(f["val_plain"]).softmax(1), head(f["val_mirror"]).softmax(1)
        head.train()
        epochs.append((rec, p.argmax(1).eq(f["val_y"]), ((p + q) / 2).argmax(1).eq(f["val_y"])))

    train_head(head, x, y, f["val_plain"], f["val_y"], epochs=cfg.epochs_frozen, lr=cfg.lr_head,
               weight_decay=cfg.weight_decay, label_smoothing=cfg.label_smoothing, batch_size=cfg.batch_size,
               seed=seed, optimizer=cfg.optimizer, on_epoch=on_epoch)
    best = max(epochs, key=lambda e: selection_score(e[0]["val_accuracy"], e[0]["val_loss"]))
    best_tta = max(int(e[2].sum()) for e in epochs)
    return int(best[1].sum()), int(epochs[-1][1].sum()), best_tta, int(epochs[-1][2].sum()), best[1]


def wise_ft(args, spec, splits, k: int, cache: Path) -> list[tuple[float, int, float]]:
    """[(alpha, correct, val loss)] between the head-only and the K-epoch fine-tuned model."""
    import transferlab

    with tempfile.TemporaryDirectory() as tmp:
        run = transferlab.train(args.data if args.limit is None else _limited_folder(splits, Path(tmp)),
                                backbone=args.backbone, epochs_finetune=k, finetune_gate=0, progress=False,
                                report=False, cache_dir=str(cache), out=str(Path(tmp) / "run")).run_dir
        head_only = load_tensors(run / "checkpoints" / "stage1.safetensors")
        last = json.loads((run / "checkpoints" / "last.json").read_text())
        tuned = {key[len("model."):]: v for key, v in
                 load_tensors(run / "checkpoints" / last["tensors_file"]).items() if key.startswith("model.")}
        meta = json.loads((run / "model.json").read_text())
    pre = spec.preprocessing.with_size(meta["preprocessing"]["input_size"])
    model = build_classifier(replace(spec, preprocessing=pre), len(splits.classes), HeadConfig()).eval()
    transform = eval_transform(pre)
    x = torch.stack([transform(load_image(s.path)) for s in splits.val])
    y = torch.tensor([s.label for s in splits.val])
    rows = []
    for a in WISE_ALPHAS:
        model.load_state_dict({n: torch.lerp(v.float(), tuned[n].float(), a).to(v.dtype) if v.is_floating_point()
                               else tuned[n] for n, v in head_only.items()})
        with torch.no_grad():
            logits = torch.cat([model(x[i:i + 64]) for i in range(0, len(x), 64)])
        rows.append((a, int(logits.argmax(1).eq(y).sum()), F.cross_entropy(logits, y).item()))
    return rows


def _limited_folder(splits, root: Path) -> Path:
    """An ImageFolder tree of links to the limited splits, for the train() of a smoke run."""
    for split in ("train", "val"):
        for s in getattr(splits, split):
            dest = root / "data" / split / splits.classes[s.label] / Path(s.path).name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.symlink_to(Path(s.path).resolve())
    return root / "data"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.data.is_dir():
        print(f"no data at {args.data} (ants/bees: ../shared/data/hymenoptera_data)", file=sys.stderr)
        return 2
    _runtime.setup_torch()
    cfg = TrainConfig(data=str(args.data), backbone=args.backbone)
    spec = resolve_backbone(cfg.backbone)
    sizes = [int(s) for s in args.sizes.split(",") if s] or [spec.test_size or spec.preprocessing.input_size]
    splits = _limited(load_splits(str(args.data), val_split=cfg.val_split, seed=0, progress=False), args.limit)
    n = len(splits.val)
    print(f"{args.backbone} on {args.data}: {len(splits.train)} train / {n} val images; head seeds 0-{args.seeds - 1}; "
          f"head: {cfg.epochs_frozen} epochs, {cfg.optimizer} lr {cfg.lr_head}, wd {cfg.weight_decay}, "
          f"label smoothing {cfg.label_smoothing}")
    results: dict = {"n_val": n, "heads": [], "always_wrong": [], "wise": {}}
    for size in sizes:
        t0 = time.perf_counter()
        feats = frozen_features(spec, splits, size)
        print(f"\n== {size} px (features, plain and mirrored: {time.perf_counter() - t0:.1f}s) ==")
        for kind in ("linear", "mlp"):
            for mirrored in (False, True):
                runs = [head_counts(feats, kind, mirrored, s, cfg) for s in range(args.seeds)]
                best, last, best_tta, last_tta, right = zip(*runs)
                name = f"{size}px {kind:6s} train {'plain+mirror' if mirrored else 'plain':12s}"
                results["heads"].append({"config": name.split(), "best": best, "last": last,
                                         "best_tta": best_tta, "last_tta": last_tta})
                print(f"{name}  best epoch {list(best)} mean {statistics.mean(best):.2f}  last {statistics.mean(last):.2f}"
                      f"  | flip TTA best {list(best_tta)} mean {statistics.mean(best_tta):.2f}"
                      f"  last {statistics.mean(last_tta):.2f}  (of {n})")
                if kind == "linear" and not mirrored:
                    wrong = ~torch.stack(right).any(0)
                    always = [str(Path(s.path).relative_to(args.data)) for s, w in zip(splits.val, wrong) if w]
                    results["always_wrong"].append({"size": size, "paths": always})
                    print(f"  wrong under all {args.seeds} plain linear heads ({len(always)}): {', '.join(always)}")
    ks = [int(k) for k in args.finetune_epochs.split(",") if k]
    if ks:
        print(f"\n== WiSE-FT: head-only (a=0) to fine-tuned (a=1), fp32 at the eval size ==")
    with tempfile.TemporaryDirectory() as cache:
        for k in ks:
            rows = wise_ft(args, spec, splits, k, Path(cache))
            results["wise"][k] = rows
            print(f"fine-tuning epochs {k}: " + " | ".join(f"a={a:.2f} {c}/{n} (loss {loss:.4f})" for a, c, loss in rows))
    top = max(results["heads"], key=lambda h: statistics.mean(h["best"]))
    top_last = max(results["heads"], key=lambda h: statistics.mean(h["last"]))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"accuracy_ceiling_{datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"results: {path}")
    print(f"best_epoch_mean={statistics.mean(top['best']):.2f} ({' '.join(top['config'])}) "
          f"last_epoch_mean={statistics.mean(top_last['last']):.2f} ({' '.join(top_last['config'])}) n_val={n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
