"""Compare backbones × strategies by really training each cell, then one table, plots and HTML page.

Each cell is an ordinary run directory ``DIR/<backbone>__<strategy>``, trained by ``transferlab.train``,
so everything about it (report, evaluate, predict, resume) works as for any run. The grid is
restartable: a finished cell is skipped, an interrupted one resumed (``train(resume=cell)``), as
``RunDir.status`` tells them apart; a cell trained with other
settings than the ones asked for is an error rather than a silently mixed comparison.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from transferlab.paths import slug
from transferlab.run_dir import RunDir, best_val_accuracy

__all__ = ["COMPARE_COLUMNS", "CompareResult", "cell_dir", "compare"]

log = logging.getLogger("transferlab")
# the strategies a comparison trains unless told: the frozen head alone against the default recipe
COMPARE_STRATEGIES = ("head-only", "two-stage")

COMPARE_COLUMNS = [
    "backbone", "strategy", "status", "pretrained", "img_size", "val_accuracy_feature_extraction",
    "val_accuracy_finetune", "val_accuracy_best", "val_loss_best", "best_phase", "train_seconds", "epochs", "latency_ms_b1",
    "peak_train_mem_mb", "peak_infer_mem_mb", "params", "run_dir",
]
CELL_FILE = "compare_cell.json"  # per cell: what compare measured while training it
# Settings a finished cell must share with the grid asked for (others, e.g. progress, do not matter).
_COMPARED_SETTINGS = ("backbone", "strategy", "pretrained", "epochs_frozen", "epochs_finetune", "img_size", "seed",
                      "head", "lr_head", "lr_finetune", "augment", "val_split", "batch_size")


@dataclass
class CompareResult:
    """One row per cell (backbone-major, in the order asked), the files written, the output folder."""

    out_dir: Path
    rows: list[dict[str, Any]]
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def best(self) -> dict[str, Any]:
        # The rule `train` uses for its own best model, then the faster one.
        from transferlab.training.head_stage import selection_score

        def key(r: dict[str, Any]) -> tuple:
            return (*selection_score(r["val_accuracy_best"], r.get("val_loss_best")), -r["train_seconds"])

        return max(self.rows, key=key)


def _split(values: str | Iterable[str]) -> list[str]:
    items = values.split(",") if isinstance(values, str) else list(values)
    return list(dict.fromkeys(v.strip() for v in items if v.strip()))


def cell_dir(out_dir: Path, backbone: str, strategy: str) -> Path:
    """DIR/<backbone>__<strategy>; characters a folder name cannot hold become '-'."""
    return Path(out_dir) / f"{slug(backbone)}__{strategy}"


def _check_same_settings(run_dir: Path, wanted: Mapping[str, Any], data: str | Path) -> None:
    from transferlab.errors import RunDirError

    saved = RunDir(run_dir).config()
    diffs = [f"{k}={getattr(saved, k)!r} (asked: {wanted[k]!r})" for k in _COMPARED_SETTINGS
             if k in wanted and wanted[k] is not None and getattr(saved, k) != wanted[k]]
    if Path(saved.data).expanduser().resolve() != Path(data).expanduser().resolve():
        diffs.append(f"data={saved.data!r} (asked: {str(data)!r})")
    if diffs:
        raise RunDirError(f"'{run_dir}' was trained with other settings: {'; '.join(diffs)}. Choose another --out, "
                          "or delete that folder to retrain it.")


def _train_cell(run_dir: Path, status: str, data: str | Path, options: Mapping[str, Any], device: str) -> str:
    """Train or resume one cell, recording its peak memory beside it. Returns what was done."""
    from transferlab.config import TrainConfig
    from transferlab.evaluation.benchmark import PeakMemory
    from transferlab.io import atomic_write_json
    from transferlab.training.run import train

    with PeakMemory(device) as peak:
        if status == "interrupted":
            log.info("resuming %s", run_dir)
            train(TrainConfig(), resume=run_dir)
        else:
            log.info("training %s", run_dir)
            train(TrainConfig.from_options("compare", data, {**options, "out": str(run_dir)}))
    atomic_write_json(run_dir / CELL_FILE, {"peak_train_mem_mb": round(peak.mb, 1), "peak_memory_exact": peak.exact,
                                            "device": device, "resumed": status == "interrupted"})
    return "resumed" if status == "interrupted" else "trained"


def _cell_row(run_dir: Path, backbone: str, strategy: str, status: str, device: str) -> tuple[dict[str, Any], list]:
    from transferlab import _runtime
    from transferlab.evaluation.benchmark import inference_cost
    from transferlab.evaluation.predict import load_run_model
    from transferlab.io import read_json

    rd = RunDir(run_dir)
    summary, metrics = rd.summary(), rd.metrics()
    cell = read_json(run_dir / CELL_FILE) if (run_dir / CELL_FILE).is_file() else {}
    model, meta = load_run_model(run_dir)
    autocast = _runtime.autocast_dtype(_runtime.resolve_precision("auto", device, training=False))
    cost = inference_cost(model, meta["preprocessing"]["input_size"], batch_sizes=(1,), device=device,
                          autocast_dtype=autocast)
    row = {
        "backbone": backbone, "strategy": strategy, "status": status, "pretrained": summary.get("pretrained"),
        "img_size": summary.get("img_size"),
        "val_accuracy_feature_extraction": best_val_accuracy(metrics, "frozen"),
        "val_accuracy_finetune": best_val_accuracy(metrics, "finetune"),
        "val_accuracy_best": summary["val_accuracy_best"], "val_loss_best": summary.get("best", {}).get("val_loss"),
        "best_phase": summary.get("best", {}).get("phase"),
        "train_seconds": summary.get("total_seconds"), "epochs": len(metrics),
        "latency_ms_b1": cost["latency_ms_b1"], "peak_train_mem_mb": cell.get("peak_train_mem_mb"),
        "peak_infer_mem_mb": round(cost["peak_mem_mb"], 1), "params": sum(p.numel() for p in model.parameters()),
        "run_dir": str(run_dir),
    }
    return row, metrics


def compare(
    data: str | Path,
    backbones: str | Iterable[str],
    strategies: str | Iterable[str] = COMPARE_STRATEGIES,
    *,
    out: str | Path | None = None,
    device: str = "auto",
    **options: Any,
) -> CompareResult:
    """Train (or skip/resume) every backbone × strategy cell, then write compare.csv, compare.json,
    compare_accuracy.png, compare_curves.png and compare.html into `out` (default runs/compare-<time>).
    `options` are TrainConfig fields shared by all cells; report=False unless given."""
    from transferlab import _runtime
    from transferlab.config import TrainConfig
    from transferlab.errors import TransferlabError
    from transferlab.io import atomic_write_json, ensure_writable_dir
    from transferlab.reporting.compare_report import plot_compare_accuracy, plot_compare_curves, write_compare_html

    names, strats = _split(backbones), _split(strategies)
    if not names or not strats:
        raise TransferlabError("compare needs at least one backbone (--backbones a,b) and one strategy.")
    out_dir = Path(out) if out else Path("runs") / f"compare-{datetime.now():%Y%m%d-%H%M%S}"
    options = {"report": False, **options, "device": device}
    grid = [(b, s, {**options, "backbone": b, "strategy": s}) for b in names for s in strats]
    for _, _, cell_options in grid:  # every cell's settings are valid before the first one trains
        TrainConfig(data=str(data), **cell_options).validate()
    ensure_writable_dir(out_dir)
    accelerator = _runtime.resolve_accelerator(device)
    import transferlab.training.run  # noqa: F401 - imported now, or the first cell's peak memory carries Lightning

    rows, curves = [], {}
    for backbone, strategy, cell_options in grid:
        run_dir = cell_dir(out_dir, backbone, strategy)
        status = RunDir(run_dir).status
        if status != "new":
            _check_same_settings(run_dir, cell_options, data)
        if status == "finished":
            log.info("%s: finished earlier, skipped", run_dir.name)
            done = "skipped"
        else:
            done = _train_cell(run_dir, status, data, cell_options, accelerator)
        row, metrics = _cell_row(run_dir, backbone, strategy, done, accelerator)
        rows.append(row)
        curves[run_dir.name] = metrics

    files = {"csv": out_dir / "compare.csv", "json": out_dir / "compare.json",
             "accuracy_plot": plot_compare_accuracy(rows, out_dir / "compare_accuracy.png"),
             "curves_plot": plot_compare_curves(curves, out_dir / "compare_curves.png")}
    with open(files["csv"], "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COMPARE_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_json(files["json"], {
        "data": str(data), "backbones": names, "strategies": strats, "device": accelerator,
        "options": {k: v for k, v in options.items() if isinstance(v, (str, int, float, bool, type(None)))},
        "rows": rows, "curves": curves,
        "notes": {"latency_ms_b1": "median ms per forward pass of the trained model, batch 1, after warm-up",
                  "peak_train_mem_mb": "increase of peak process memory (CPU: resident set) while training the cell",
                  "peak_infer_mem_mb": "weights + peak added by a batch-1 forward pass"},
    })
    files["html"] = write_compare_html(rows, files, out_dir / "compare.html", data=str(data))
    result = CompareResult(out_dir=out_dir, rows=rows, files=files)
    log.info("compare: best %s × %s (val accuracy %.4f); %s", result.best["backbone"], result.best["strategy"],
             result.best["val_accuracy_best"], files["html"])
    return result
