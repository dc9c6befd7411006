"""Levers of boundary fine-tuning, measured on the suite with the package's own pieces (issue 19).

Phase 1 (`cache`, once per dataset, minutes): the frozen bottom of efficientnet_lite0 (cut before its last
`--stages` stages, BatchNorm folded, fp32 or the CPU's native bf16) over the plain train/val/test images at
the eval size and `--views` augmented train views, stored as bf16 in `--cache/<dataset>.pt`.

Phase 2 (`run`, seconds to minutes per variant): the head trained on the pooled features of the plain
view exactly as `transferlab train` does (16 epochs, AdamW 1e-3, wd 1e-2, label smoothing 0.1), then the top
trained by `training.boundary.train_top` for each variant (views used, epochs, lr, batch). Printed per
variant: head val/test, the val-chosen epoch's val/test, the summed epoch seconds, and whether the
`--finetune-when underfit` rule would have run it. Choices are made on val; test is reported.

    .venv/bin/python bench/boundary_levers.py cache --datasets sign_digits,scene15
    .venv/bin/python bench/boundary_levers.py run --datasets sign_digits --variants "v1e6,v0e6,v1e4"

A variant name is `[s<stages>]v<views>e<epochs>[l<lr>|lauto][b<batch>]`, e.g. v0e4l2e-3b64, v0e4lauto (the LR
`--lr-finetune auto` would pick) or s1v1e6: `s1` trains only
the last stage, on the cached activations passed once through the frozen stage before it (fewer stages
than were cached only).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "../shared/data/suite"


def _data(name: str):
    from transferlab.data.sources import load_splits

    root = (REPO / "../shared/data/hymenoptera_data" if name == "ants_bees" else SUITE / name).resolve()
    return load_splits(root, progress=False)


def cache(args) -> None:
    import torch

    from transferlab import _runtime
    from transferlab.data.datasets import ImageDataset
    from transferlab.data.transforms import eval_transform, train_transform
    from transferlab.models.fold_bn import folded_for_inference
    from transferlab.models.heads import HeadConfig, build_classifier
    from transferlab.models.registry import resolve_backbone
    from transferlab.training import boundary

    _runtime.setup_torch()
    autocast = torch.bfloat16 if _runtime.cpu_supports_bf16() else None
    args.cache.mkdir(parents=True, exist_ok=True)
    for name in args.datasets:
        out = args.cache / f"{name}.pt"
        if out.exists():
            print(f"{name}: cached already ({out})", flush=True)
            continue
        splits = _data(name)
        spec = resolve_backbone("efficientnet_lite0")
        size = spec.test_size or spec.preprocessing.input_size
        pre = spec.preprocessing.with_size(size)
        torch.manual_seed(0)
        model = build_classifier(spec, len(splits.classes), HeadConfig())
        split = boundary.split_model(model, args.stages)
        bottom = folded_for_inference(copy.deepcopy(split.bottom).eval(), size).to(memory_format=torch.channels_last)
        doc = {"classes": splits.classes, "size": size, "stages": args.stages}
        t0 = time.perf_counter()
        for s in ("train", "val", "test"):
            samples = getattr(splits, s)
            if not samples:
                continue
            doc[f"{s}_y"] = torch.tensor([x.label for x in samples])
            doc[f"{s}_plain"] = boundary.cache_activations(bottom, ImageDataset(samples, eval_transform(pre)),
                                                           batch_size=64, autocast=autocast)
            print(f"{name}: {s} plain {len(samples)} images, {time.perf_counter() - t0:.0f}s", flush=True)
        for v in range(1, args.views + 1):
            torch.manual_seed(500 + v)
            doc[f"train_view{v}"] = boundary.cache_activations(
                bottom, ImageDataset(splits.train, train_transform(pre, "standard")), batch_size=64, autocast=autocast)
            print(f"{name}: train view {v}, {time.perf_counter() - t0:.0f}s", flush=True)
        doc["top_state"] = split.top.state_dict()
        torch.save(doc, out)


def _variant(text: str) -> dict:
    m = re.fullmatch(r"(?:s(\d+))?v(\d+)e(\d+)(?:l([0-9.e-]+|auto))?(?:b(\d+))?", text)
    if not m:
        raise SystemExit(f"bad variant {text!r}: [s<stages>]v<views>e<epochs>[l<lr>][b<batch>]")
    return {"stages": int(m[1]) if m[1] else None, "views": int(m[2]), "epochs": int(m[3]),
            "lr": m[4] if m[4] == "auto" else float(m[4] or 1e-3), "batch": int(m[5] or 32)}


def run(args) -> None:
    import torch

    from transferlab import _runtime
    from transferlab.models.heads import HeadConfig, build_classifier, head_slot
    from transferlab.models.registry import resolve_backbone
    from transferlab.training import boundary
    from transferlab.training.head_stage import evaluate_logits, selection_score, train_head

    _runtime.setup_torch()
    autocast = torch.bfloat16 if _runtime.cpu_supports_bf16() else None
    results = []
    for name in args.datasets:
        doc = torch.load(args.cache / f"{name}.pt", weights_only=True)
        spec = resolve_backbone("efficientnet_lite0")
        has_test = "test_y" in doc
        test_x, test_y = (doc["test_plain"], doc["test_y"]) if has_test else (doc["val_plain"], doc["val_y"])
        for seed in args.seeds:
            torch.manual_seed(seed)
            model = build_classifier(spec, len(doc["classes"]), HeadConfig(), load_weights=False)
            split = boundary.split_model(model, doc["stages"])
            split.top.load_state_dict(doc["top_state"])
            head = head_slot(model)
            # pooled features of the plain view: the top with its head bypassed
            head.bypass = True
            feats = {s: _pooled(split.top, doc[f"{s}_plain"]) for s in ("train", "val")}
            feats["test"] = _pooled(split.top, test_x)
            head.bypass = False
            torch.manual_seed(seed)
            recs, best = train_head(head.head, feats["train"], doc["train_y"], feats["val"], doc["val_y"], epochs=16,
                                    lr=1e-3, weight_decay=1e-2, label_smoothing=0.1, batch_size=32, seed=seed)
            head.head.load_state_dict(best)
            hb = max(recs, key=lambda r: selection_score(r["val_accuracy"], r["val_loss"]))
            head_test = evaluate_logits(head.head, feats["test"], test_y)[1]
            underfit = boundary.head_underfits(hb["train_accuracy"], hb["val_accuracy"])
            # train accuracy of the head in eval mode (what the rule should read: no dropout)
            head_train_eval = evaluate_logits(head.head, feats["train"], doc["train_y"])[1]
            base_state = copy.deepcopy(split.top.state_dict())
            print(f"\n{name} seed {seed}: head val {hb['val_accuracy']:.4f} (loss {hb['val_loss']:.4f}) test "
                  f"{head_test:.4f}; head train acc {hb['train_accuracy']:.4f} (eval mode {head_train_eval:.4f}) "
                  f"-> underfit rule: {'run' if underfit else 'skip'}", flush=True)
            for vname in args.variants:
                v = _variant(vname)
                split.top.load_state_dict(base_state)
                views = [doc["train_plain"]] + [doc[f"train_view{i}"] for i in range(1, v["views"] + 1)]
                top, val_x, tx = split.top, doc["val_plain"], test_x
                if v["stages"] is not None and v["stages"] < doc["stages"]:
                    k = doc["stages"] - v["stages"]  # frozen stages moved from the top to the bottom
                    frozen = torch.nn.Sequential(*list(split.top)[:k]).eval()
                    top = torch.nn.Sequential(*list(split.top)[k:])
                    with torch.no_grad():
                        def through(x, frozen=frozen):
                            return torch.cat([frozen(x[i:i + 128].float()).to(x.dtype) for i in range(0, len(x), 128)])
                        views, val_x, tx = [through(x) for x in views], through(val_x), through(tx)
                    for p in frozen.parameters():
                        p.requires_grad_(False)
                states = {}

                def on_epoch(rec, improved, states=states, top=top):
                    states[rec["epoch"]] = copy.deepcopy(top.state_dict())

                t = time.perf_counter()
                if v["lr"] == "auto":  # as `train --lr-finetune auto` picks it (training/run.py _boundary_lr)
                    steps = min(100, 2 * -(-len(doc["train_y"]) // v["batch"]))
                    found = boundary.range_test_top(top, views, doc["train_y"], head_lr_multiplier=3.0,
                                                    weight_decay=1e-2, label_smoothing=0.1, batch_size=v["batch"],
                                                    seed=seed, num_steps=steps)
                    v["lr"] = found.suggestion or 1e-3
                    print(f"  {vname}: range test suggests {found.suggestion}", flush=True)
                records, best_top, _ = boundary.train_top(
                    top, views, doc["train_y"], val_x, doc["val_y"], epochs=v["epochs"], lr=v["lr"],
                    head_lr=3 * v["lr"], weight_decay=1e-2, label_smoothing=0.1, batch_size=v["batch"], seed=seed,
                    baseline=selection_score(hb["val_accuracy"], hb["val_loss"]), autocast=autocast, on_epoch=on_epoch)
                secs = time.perf_counter() - t
                per_epoch_test = []
                for r in records:
                    top.load_state_dict(states[r["epoch"]])
                    per_epoch_test.append(boundary.evaluate_top(top, tx, test_y, autocast)[1])
                chosen = max(range(len(records)), key=lambda i: selection_score(records[i]["val_accuracy"],
                                                                                records[i]["val_loss"]))
                beat = best_top is not None
                final_val = records[chosen]["val_accuracy"] if beat else hb["val_accuracy"]
                final_test = per_epoch_test[chosen] if beat else head_test
                row = {"dataset": name, "seed": seed, "variant": vname, "head_val": hb["val_accuracy"],
                       "head_test": head_test, "underfit": underfit, "head_train": hb["train_accuracy"],
                       "head_train_eval": head_train_eval, "val": final_val, "test": final_test,
                       "kept": "finetune" if beat else "head", "seconds": secs,
                       "epochs": [{"val": r["val_accuracy"], "val_loss": r["val_loss"], "test": te,
                                   "train": r["train_accuracy"], "s": r["epoch_seconds"]}
                                  for r, te in zip(records, per_epoch_test)]}
                results.append(row)
                print(f"  {vname:<14} kept {row['kept']:<8} val {final_val:.4f} test {final_test:.4f} "
                      f"({secs:.0f}s) epochs val/test: " + " ".join(f"{e['val']:.3f}/{e['test']:.3f}" for e in row["epochs"]),
                      flush=True)
                if args.json:
                    args.json.write_text(json.dumps(results, indent=1))


def _pooled(top, x):
    import torch

    with torch.no_grad():
        top.eval()
        return torch.cat([top(x[i:i + 128].float()) for i in range(0, len(x), 128)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("phase", choices=["cache", "run"])
    p.add_argument("--datasets", default="sign_digits,scene15,brain_tumor_mri,potato_leaf,ants_bees")
    p.add_argument("--cache", type=Path, default=REPO / "bench/results/boundary_cache")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--views", type=int, default=1)
    p.add_argument("--variants", default="v1e6,v0e6,v1e4,v0e4")
    p.add_argument("--seeds", default="0")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    args.datasets = args.datasets.split(",")
    args.variants = args.variants.split(",")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    (cache if args.phase == "cache" else run)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
