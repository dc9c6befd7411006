"""One self-contained HTML page for one run, or comparing several: everything a reviewer needs to
judge a run (config, data, curves, metrics, errors, timing, environment) in a file that can be mailed.

Self-contained means: images are base64 ``data:`` URIs, CSS is inline, there is no script and no URL.
Every string that comes from the user (class names, paths, config values) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from transferlab.errors import RunDirError, TransferlabError
from transferlab.evaluation.doctor import CHECKS, CSV_NAME, JSON_NAME, RUN_SUBDIR, doctor_run, load_doctor
from transferlab.evaluation.evaluate import eval_json_paths, evaluate_run, load_eval
from transferlab.evaluation.explain import explain_evaluation
from transferlab.io import atomic_write_text, is_writable_dir, read_json
from transferlab.reporting.curves import plot_curves
from transferlab.reporting.plots import doctor_plots, eval_plots
from transferlab.run_dir import RunDir

__all__ = ["write_report"]

log = logging.getLogger("transferlab")

MAX_LISTED = 200  # rows of skipped files / top losses shown; the JSON files have all of them
MOST_CONFUSED_SHOWN = 15

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d232b;background:#fff;
 margin:0 auto;max-width:1240px;padding:16px 28px 60px}
h1{font-size:24px;margin:18px 0 4px}h2{font-size:20px;margin:36px 0 8px;padding-top:14px;border-top:3px solid #3a6ea5}
h3{font-size:16px;margin:22px 0 6px}h4{font-size:14px;margin:16px 0 4px;color:#3a4654}
table{border-collapse:collapse;margin:6px 0 12px;font-size:13px}
th,td{border:1px solid #d5dbe2;padding:3px 9px;text-align:left;vertical-align:top}
th{background:#eef2f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.best td{font-weight:600;background:#f1f8ec}
img{max-width:100%;height:auto;border:1px solid #e3e7ec;margin:4px 0}
.muted{color:#69737f}.warn{color:#8a4b00;background:#fff4e0;padding:2px 6px;border-radius:3px}
.leak{color:#9b1c1c;background:#fde8e8;padding:2px 6px;border-radius:3px}
.grid{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}.grid>div{flex:1 1 440px}
code,.path{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12px;word-break:break-all}
nav a{margin-right:14px}
.cams{display:flex;flex-wrap:wrap;gap:10px}.cams figure{margin:0;width:178px}
.cams figcaption{font-size:12px;line-height:1.3;word-break:break-word}
"""


class _Html(str):
    """A fragment that is already safe HTML (built here); everything else is escaped."""


def _esc(value: Any) -> str:
    return value if isinstance(value, _Html) else html.escape(str(value), quote=True)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "—" if math.isnan(value) else f"{value:.{digits}f}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _cell(value: Any, digits: int = 4) -> str:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f"<td{' class=num' if numeric else ''}>{_esc(value if isinstance(value, _Html) else _fmt(value, digits))}</td>"


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, digits: int = 4,
           row_class: Sequence[str] | None = None) -> _Html:
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{row_class[i]}"' if row_class and row_class[i] else ""
        body.append(f"<tr{cls}>{''.join(_cell(v, digits) for v in row)}</tr>")
    return _Html(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")


def _img(path: Path, alt: str) -> _Html:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return _Html(f'<img src="data:image/png;base64,{data}" alt="{_esc(alt)}">')


def _count_params(weights: Path) -> int | None:
    """Parameters from the safetensors header alone (no tensor is loaded); BatchNorm buffers excluded."""
    if not weights.is_file():
        return None
    from safetensors import SafetensorError, safe_open

    buffers = ("running_mean", "running_var", "num_batches_tracked")
    try:
        with safe_open(str(weights), framework="pt") as f:
            names = f.keys()  # safe_open is not iterable
            return sum(math.prod(f.get_slice(k).get_shape()) for k in names if not k.endswith(buffers))
    except (SafetensorError, OSError):
        return None


def _optional_json(path: Path) -> dict[str, Any]:
    return read_json(path) if path.is_file() else {}


def _load_run(run_dir: Path, progress: bool, artefacts: Path) -> dict[str, Any]:
    """Everything the page shows about one run; evaluates its val split first when it has no evaluation.
    What the report makes (that evaluation, the plots) goes into `artefacts`: the run itself, or a
    scratch folder when the run is not to be written into."""
    if not run_dir.is_dir():
        raise RunDirError(f"Run directory '{run_dir}' does not exist.")
    evals = eval_json_paths(run_dir) or eval_json_paths(artefacts)
    if not evals:
        log.info("%s has no evaluation yet: evaluating its val split", run_dir)
        evaluate_run(run_dir, split="val", progress=progress, out_dir=artefacts)
        evals = eval_json_paths(artefacts)
    rd = RunDir(run_dir)
    config = rd.config().to_dict() if rd.is_run else {}
    rows = rd.metrics()
    curves = rd.curves_path
    if not curves.is_file() and rows:
        curves = plot_curves(rows, RunDir(artefacts).curves_path, title=run_dir.name)
    evaluations = []
    for path in evals:
        ev = load_eval(path)
        evaluations.append({"eval": ev, "plots": eval_plots(ev, artefacts / path.stem),
                            "cams": _load_cams(run_dir, ev, artefacts / path.stem / "cam")})
    return {
        "dir": run_dir,
        "doctor": _load_doctor(run_dir, progress, artefacts),
        "config": config,
        "summary": rd.summary(),
        "data": rd.data_summary(),
        "model": rd.model_meta(),
        "rows": rows,
        "curves": curves if curves.is_file() else None,
        "params": _count_params(rd.weights_path),
        "evaluations": evaluations,
        "recipe": _optional_json(run_dir / "recipe.json"),
    }


def _load_cams(run_dir: Path, ev: Mapping[str, Any], out_dir: Path) -> dict[str, Any]:
    """{"overlays": class-activation maps of the evaluation's worst errors and correct sample} or {"error"}
    when they cannot be made (say, an architecture without a spatial map): the report is written either way."""
    try:
        return {"overlays": explain_evaluation(run_dir, ev, out_dir)}
    except (TransferlabError, OSError, ValueError, RuntimeError) as exc:
        log.warning("no class-activation maps in the report of %s: %s", run_dir, exc)
        return {"error": str(exc)}


def _load_doctor(run_dir: Path, progress: bool, artefacts: Path) -> dict[str, Any]:
    """The data doctor of the run's data (RUN/doctor/doctor.json), run first when the run has none, with its
    pictures: {"result", "plots"}, or {"error"} when it cannot run (the data moved, say). The report is
    written either way. Only from the run's cached features: a report never costs another forward pass
    over the data (a run that kept no features says how to run the doctor instead). What it makes goes
    into `artefacts` (the run itself, or the scratch folder of a run not to be written into)."""
    path = run_dir / RUN_SUBDIR / JSON_NAME
    try:
        if not path.is_file():
            log.info("%s has no data doctor yet: running it on the run's data", run_dir)
            path = artefacts / RUN_SUBDIR / JSON_NAME
            doctor_run(run_dir, progress=progress, only_if_cached=True, out=path.parent)
        result = load_doctor(path)
        return {"result": result, "plots": doctor_plots(result, artefacts / RUN_SUBDIR)}
    except (TransferlabError, OSError, ValueError, RuntimeError) as exc:
        log.warning("no data doctor in the report of %s: %s", run_dir, exc)
        return {"error": str(exc)}


def _labels(run_dirs: Sequence[Path]) -> list[str]:
    """Short names (the folder name) unless two runs share one; then the paths as given."""
    names = [p.name or str(p) for p in run_dirs]
    return names if len(set(names)) == len(names) else [str(p) for p in run_dirs]


def _val_eval(run: Mapping[str, Any]) -> dict[str, Any] | None:
    evs = [e["eval"] for e in run["evaluations"]]
    return next((e for e in evs if e["name"] == "val"), evs[0] if evs else None)


def _comparison(runs: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> _Html:
    headers = ["run", "backbone", "strategy", "img size", "best val acc", "eval", "eval acc", "balanced acc",
               "ECE", "log loss", "total s", "params"]
    rows, accs = [], []
    for i, (run, label) in enumerate(zip(runs, labels)):
        s, ev = run["summary"], _val_eval(run)
        m = ev["metrics"] if ev else {}
        accs.append(s.get("val_accuracy_best", -1.0))
        rows.append([
            _Html(f'<a href="#run-{i}">{_esc(label)}</a>'), s.get("backbone", run["config"].get("backbone")),
            s.get("strategy", run["config"].get("strategy")), s.get("img_size"), s.get("val_accuracy_best"),
            ev["name"] if ev else None, m.get("accuracy"), m.get("balanced_accuracy"), m.get("ece"),
            m.get("log_loss"), _fmt(s.get("total_seconds"), 1), f"{run['params']:,}" if run["params"] else None,
        ])
    best = max(range(len(runs)), key=lambda i: accs[i])
    return _table(headers, rows, row_class=["best" if i == best else "" for i in range(len(runs))])


def _config_section(config: Mapping[str, Any]) -> _Html:
    # as written in config.yaml: a learning rate of 1e-6 must not print as 0.0000
    rows = [[k, json.dumps(v) if isinstance(v, (dict, list)) else _fmt(v) if v is None or isinstance(v, bool) else str(v)]
            for k, v in config.items()]
    return _Html("<h3>Configuration</h3>" + (_table(["option", "value"], rows) if rows else
                                              "<p class=muted>no config.yaml</p>"))


def _data_section(data: Mapping[str, Any]) -> _Html:
    if not data:
        return _Html("<h3>Data</h3><p class=muted>no data.json</p>")
    counts = data.get("counts", {})
    splits = [s for s in ("train", "val", "test") if any(counts.get(s, {}).values())]
    classes = data.get("classes", [])
    rows = [[c, *[counts[s].get(c, 0) for s in splits], sum(counts[s].get(c, 0) for s in splits)] for c in classes]
    rows.append([_Html("<b>total</b>"), *[sum(counts[s].values()) for s in splits],
                 sum(sum(counts[s].values()) for s in splits)])
    parts = [f"<h3>Data</h3><p>layout: {_esc(data.get('layout', '?'))}, {len(classes)} classes</p>",
             _table(["class", *splits, "all"], rows)]
    warnings = data.get("warnings", [])
    if warnings:
        items = "".join(f"<li><span class={'leak' if 'duplicate across' in w else 'warn'}>"
                        f"{'leakage: ' if 'duplicate across' in w else ''}{_esc(w)}</span></li>" for w in warnings)
        parts.append(f"<h4>Warnings ({len(warnings)})</h4><ul>{items}</ul>")
    parts.append(_skipped_list(data.get("skipped", []), "Skipped files"))
    return _Html("".join(parts))


def _skipped_list(skipped: Sequence[Mapping[str, str]], title: str) -> str:
    if not skipped:
        return f"<p class=muted>{_esc(title)}: none</p>"
    rows = [[_Html(f"<span class=path>{_esc(s.get('path', ''))}</span>"), s.get("reason", "")]
            for s in skipped[:MAX_LISTED]]
    more = f"<p class=muted>and {len(skipped) - MAX_LISTED} more</p>" if len(skipped) > MAX_LISTED else ""
    return f"<h4>{_esc(title)} ({len(skipped)})</h4>" + _table(["file", "reason"], rows) + more


def _doctor_section(doctor: Mapping[str, Any]) -> _Html:
    """Findings of the data doctor: a count per check, the pictures, the worst findings of each kind."""
    if "error" in doctor:
        return _Html(f"<h3>Data doctor</h3><p class=muted>not run: {_esc(doctor['error'])}</p>")
    d, plots = doctor["result"], doctor["plots"]
    root, top = Path(d.get("root", "")), d["options"]["top"]

    def short(path: str) -> _Html:
        try:
            shown = Path(path).relative_to(root).as_posix()
        except ValueError:
            shown = path
        return _Html(f"<span class=path>{_esc(shown)}</span>")

    parts = ["<h3>Data doctor</h3>",
             (f"<p>{_esc(d['backbone'])} features{' (from the cache)' if d['features_cached'] else ''}, "
              f"{_fmt(d['seconds']['total'], 1)} s; every finding in <span class=path>"
              f"{_esc(Path(d.get('out_dir') or RUN_SUBDIR) / CSV_NAME)}</span></p>")]
    summary = d["summary"]
    parts.append(_table(["check", "findings", "score"],
                        [[CHECKS[k].title if k in CHECKS else k, n, d["checks"].get(k, {}).get("score", "")]
                         for k, n in summary.items()]))
    by_kind: dict[str, list[Mapping[str, Any]]] = {}
    for f in d["findings"]:
        by_kind.setdefault(f["kind"], []).append(f)
    figure_of = {"near_duplicate": "duplicates", "exact_duplicate": "duplicates", "label_issue": "label_issues"}
    drawn: set[str] = set()
    for kind, findings in by_kind.items():
        title = d["checks"].get(kind, {}).get("title", kind)
        cls = "leak" if kind in ("exact_duplicate", "near_duplicate") and any("leakage" in f["detail"] for f in findings) \
            else "warn"
        parts.append(f"<h4><span class={cls}>{_esc(title)}: {len(findings)}</span></h4>")
        figure = figure_of.get(kind)
        if figure in plots and figure not in drawn:
            parts.append(_img(plots[figure], title))
            drawn.add(figure)
        shown = findings[:top]
        if kind == "class_imbalance":
            rows = [[f["label"], f["score"], f["detail"]] for f in shown]
            parts.append(_table(["class", "score", "detail"], rows, digits=3))
        else:
            rows = [[short(f["path"]), f["score"], short(f["partner"]) if f["partner"] else f["suggested_label"],
                     f["detail"]] for f in shown]
            parts.append(_table(["image", "score", "other image / suggested label", "detail"], rows, digits=3))
        if len(findings) > top:
            parts.append(f"<p class=muted>and {len(findings) - top} more in findings.csv</p>")
    return _Html("".join(parts))


def _metric_rows(m: Mapping[str, Any], t: Mapping[str, Any] | None) -> list[list[Any]]:
    keys = [("accuracy", "accuracy (top-1)"), ("top_k_accuracy", f"top-{m['top_k']} accuracy"),
            ("balanced_accuracy", "balanced accuracy"), ("log_loss", "log loss"),
            ("ece", "expected calibration error")]
    rows = [[label, m[k], *([t[k]] if t else [])] for k, label in keys]
    for avg in ("macro", "weighted"):
        for k in ("precision", "recall", "f1"):
            rows.append([f"{avg} {k}", m[avg][k], *([t[avg][k]] if t else [])])
    rows.append(["images", m["n"], *([t["n"]] if t else [])])
    return rows


def _multilabel_section(ev: Mapping[str, Any], plots: Mapping[str, Path]) -> _Html:
    """A multi-label evaluation: headline metrics, per-label precision/recall/F1/AP/threshold, worst images."""
    m, interp = ev["metrics"], ev["interpretation"]
    parts = [f"<h3>Evaluation: {_esc(ev['name'])} (multi-label)</h3>",
             f"<p>{m['n']} images of <span class=path>{_esc(ev['data'])}</span> (split: {_esc(ev['split'])})</p>"]
    for w in ev.get("warnings", []):
        parts.append(f"<p><span class=warn>{_esc(w)}</span></p>")
    rows = [["mAP (macro average precision)", m["map"]], ["micro F1", m["micro"]["f1"]], ["macro F1", m["macro"]["f1"]],
            ["subset accuracy (exact match)", m["subset_accuracy"]], ["hamming accuracy", m["hamming_accuracy"]],
            ["log loss (binary cross-entropy)", m["log_loss"]], ["labels per image (true)", m["label_cardinality"]],
            ["labels per image (predicted)", m["predicted_cardinality"]], ["images", m["n"]]]
    parts.append("<h4>Overall</h4>" + _table(["metric", "value"], rows))
    parts.append("<h4>Per label</h4>" + _table(
        ["label", "precision", "recall", "F1", "AP", "threshold", "support"],
        [[r["label"], r["precision"], r["recall"], r["f1"], r["ap"], r["threshold"], r["support"]] for r in m["per_label"]]))
    if m.get("absent_labels"):
        parts.append(f"<p><span class=warn>no positives of: {_esc(', '.join(m['absent_labels']))}</span> "
                     "(no AP; left out of the mAP)</p>")
    if "per_label_ap" in plots:
        parts.append(f"<div class=grid><div><h4>Per-label AP</h4>{_img(plots['per_label_ap'], 'per-label AP')}</div></div>")
    losses = interp.get("top_losses") or []
    if losses:
        parts.append("<h4>Top losses</h4>" + _table(
            ["image", "true labels", "predicted labels", "loss"],
            [[_Html(f"<span class=path>{_esc(x['path'])}</span>"), ", ".join(x["true"]), ", ".join(x["predicted"]),
              x["loss"]] for x in losses[:MAX_LISTED]]))
    if ev.get("skipped"):
        parts.append(_skipped_list(ev["skipped"], "Skipped while evaluating"))
    return _Html("".join(parts))


def _evaluation_section(ev: Mapping[str, Any], plots: Mapping[str, Path]) -> _Html:
    if ev["metrics"].get("task") == "multilabel":
        return _multilabel_section(ev, plots)
    m, interp = ev["metrics"], ev["interpretation"]
    t = ev["tta"]["metrics"] if ev.get("tta") else None
    parts = [f"<h3>Evaluation: {_esc(ev['name'])}</h3>",
             (f"<p>{m['n']} images of <span class=path>{_esc(ev['data'])}</span> (split: {_esc(ev['split'])})"
              f"{', TTA views: ' + _esc(', '.join(ev['tta']['views'])) if t else ''}</p>")]
    for w in ev.get("warnings", []):
        parts.append(f"<p><span class=warn>{_esc(w)}</span></p>")
    parts.append("<h4>Overall</h4>" + _table(["metric", "value", *(["with TTA"] if t else [])], _metric_rows(m, t)))
    acc = interp["per_class_accuracy"]
    t_rows = {r["class"]: r for r in t["per_class"]} if t else {}
    rows = [[r["class"], r["precision"], r["recall"], r["f1"], r["support"], acc.get(r["class"]),
             *([t_rows[r["class"]]["recall"]] if t else [])] for r in m["per_class"]]
    parts.append("<h4>Per class</h4>" + _table(
        ["class", "precision", "recall", "F1", "support", "accuracy", *(["accuracy with TTA"] if t else [])], rows))
    if m.get("absent_classes"):
        parts.append(f"<p><span class=warn>no images of: {_esc(', '.join(m['absent_classes']))}</span> "
                     "(their rows are zeros and count in the macro averages)</p>")
    confused = interp["most_confused"][:MOST_CONFUSED_SHOWN]
    parts.append("<h4>Most confused</h4>" + (
        _table(["true", "predicted as", "images"], [[c["true"], c["predicted"], c["count"]] for c in confused])
        if confused else "<p class=muted>no confusions</p>"))
    figures = [(k, title) for k, title in (("confusion_matrix", "Confusion matrix"), ("reliability", "Calibration"),
                                           ("per_class_accuracy", "Per-class accuracy")) if k in plots]
    parts.append("<div class=grid>" + "".join(f"<div><h4>{title}</h4>{_img(plots[k], title)}</div>"
                                                for k, title in figures) + "</div>")
    parts.append(_calibration_section(m, plots))
    losses = interp["top_losses"]
    if losses:
        parts.append("<h4>Top losses</h4>")
        if "top_losses" in plots:
            parts.append(_img(plots["top_losses"], "top losses"))
        parts.append(_table(["image", "true", "predicted", "p(predicted)", "p(true)", "loss"],
                            [[_Html(f"<span class=path>{_esc(x['path'])}</span>"), x["true"], x["predicted"],
                              x["probability"], x["probability_true"], x["loss"]] for x in losses[:MAX_LISTED]]))
    if ev.get("skipped"):
        parts.append(_skipped_list(ev["skipped"], "Skipped while evaluating"))
    return _Html("".join(parts))


def _cam_section(cams: Mapping[str, Any]) -> _Html:
    """The overlays of the worst errors, then of correct predictions, each under its labels."""
    head = ("<h4>Class-activation maps</h4><p class=muted>Grad-CAM of the predicted class over the image as the "
            "model saw it: red is where it found its evidence.</p>")
    if "error" in cams:
        return _Html(f"{head}<p class=muted>not made: {_esc(cams['error'])}</p>")
    parts = [head]
    for kind, title in (("error", "Worst errors"), ("correct", "Correct predictions, least to most confident")):
        shown = [c for c in cams["overlays"] if c["kind"] == kind]
        if not shown:
            continue
        figures = []
        for c in shown:
            label = (f"{_esc(c['true'])} → {_esc(c['predicted'])}" if kind == "error" else _esc(c["true"]))
            figures.append(f"<figure>{_img(Path(c['overlay']), 'class-activation map of ' + c['path'])}<figcaption>"
                           f"{label} {c['probability']:.2f}<br><span class=path>{_esc(Path(c['path']).name)}</span>"
                           "</figcaption></figure>")
        parts.append(f"<h4>{title}</h4><div class=cams>{''.join(figures)}</div>")
    if len(parts) == 1:
        parts.append("<p class=muted>no images to explain</p>")
    return _Html("".join(parts))


def _calibration_section(m: Mapping[str, Any], plots: Mapping[str, Path]) -> _Html:
    """Temperature scaling before/after, and what --unknown auto / --sets give on this data."""
    cal, sel = m.get("calibration"), m.get("selective") or {}
    if not cal:
        return _Html("")
    parts = [f"<h4>Calibration: temperature T = {cal['temperature']:.4f}</h4>",
             _table(["metric", "before (T = 1)", "after"],
                    [["log loss", cal["log_loss_before"], m["log_loss"]], ["ECE", cal["ece_before"], m["ece"]]])]
    auto, sets = sel.get("unknown_auto"), sel.get("sets")
    if auto and sets:
        parts.append("<h4>Abstain and prediction sets</h4>" + _table(
            ["rule (thresholds from val)", "coverage", "precision / mean set size"],
            [[f"--unknown auto, target precision {auto['target_precision']} (threshold {auto['threshold']:.4f})",
              auto["coverage"], auto["precision"]],
             [f"--sets {sets['target_coverage']} ({sets['score']} score)", sets["coverage"], sets["mean_size"]]]))
    figures = [(k, title) for k, title in (("reliability_before", "Reliability before temperature scaling"),
                                           ("risk_coverage", "Risk–coverage")) if k in plots]
    if figures:
        parts.append("<div class=grid>" + "".join(f"<div><h4>{title}</h4>{_img(plots[k], title)}</div>"
                                                    for k, title in figures) + "</div>")
    return _Html("".join(parts))


def _timing_section(summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> _Html:
    phases = summary.get("phase_seconds", {})
    total = summary.get("total_seconds")
    parts = ["<h3>Timing</h3>"]
    if phases:
        table = [[k.replace("_", " "), v, f"{100 * v / total:.1f}%" if total else None] for k, v in phases.items()]
        table.append([_Html("<b>total</b>"), total, "100%" if total else None])
        parts.append(_table(["phase", "seconds", "share"], table, digits=2))
    epochs = {}
    for r in rows:
        epochs.setdefault(r.get("phase"), []).append(r.get("epoch_seconds"))
    if epochs:
        parts.append(_table(["phase", "epochs", "mean s/epoch"],
                            [[p, len(v), sum(x for x in v if isinstance(x, float)) / len(v)] for p, v in epochs.items()],
                            digits=2))
    return _Html("".join(parts) if len(parts) > 1 else "<h3>Timing</h3><p class=muted>not recorded</p>")


def _environment_section(summary: Mapping[str, Any]) -> _Html:
    keys = ["accelerator", "precision", "threads", "allocator_tuned", "bn_mode", "seed", "backbone_source",
            "pretrained"]
    rows = [[k, summary[k]] for k in keys if k in summary]
    rows += [[f"{name} version", v] for name, v in summary.get("versions", {}).items()]
    return _Html("<h3>Environment</h3>" + (_table(["", "value"], rows) if rows else "<p class=muted>not recorded</p>"))


def _published_section(run: Mapping[str, Any]) -> _Html:
    """A recipe's run: its numbers beside the figures the recipe's source published."""
    from transferlab.recipes import versus_published

    recipe = run["recipe"]
    if not recipe:
        return _Html("")
    source = recipe.get("source", {})
    link = source.get("url") or source.get("dataset")
    parts = [f"<h3>Versus published: recipe {_esc(recipe.get('name', '?'))}</h3>",
             f"<p>{_esc(source.get('title', ''))}{' — ' + _esc(link) if link else ''}</p>"]
    rows = versus_published(run["dir"], recipe.get("published", []))
    if rows:
        def verdict(r: Mapping[str, Any]) -> str:
            if r["delta"] is not None:
                return f"{100 * r['delta']:+.1f} points"
            return {True: "within", False: "outside", None: "—"}[r["within"]]

        parts.append(_table(["figure", "published", "this run", "vs published", "note"],
                            [[r["label"], r["published"], None if r["this_run"] is None else
                              f"{100 * r['this_run']:.1f} %", verdict(r), r["note"]] for r in rows]))
    else:
        parts.append("<p class=muted>the source publishes no figure for this run</p>")
    if recipe.get("overrides"):
        parts.append(f"<p class=muted>overrides: {_esc(' '.join(recipe['overrides']))}</p>")
    return _Html("".join(parts))


def _run_section(run: Mapping[str, Any], label: str, index: int) -> _Html:
    s, model = run["summary"], run["model"]
    backbone = s.get("backbone") or model.get("backbone", {}).get("name") or run["config"].get("backbone", "?")
    head = [f'<h2 id="run-{index}">{_esc(label)}</h2>',
            (f"<p><span class=path>{_esc(run['dir'])}</span> — {_esc(backbone)}, "
             f"{_esc(s.get('strategy', run['config'].get('strategy', '?')))}, "
             f"{len(model.get('classes', s.get('classes', [])))} classes"
             f"{', ' + format(run['params'], ',') + ' parameters' if run['params'] else ''}</p>")]
    if not s:
        head.append("<p><span class=warn>no summary.json: the run did not finish</span></p>")
    else:
        best = s.get("best", {})
        score = "val mAP" if s.get("task") == "multilabel" else "val accuracy"  # multi-label: the columns hold mAP
        head.append(f"<p>best {score} <b>{_fmt(s.get('val_accuracy_best'))}</b> "
                    f"({_esc(best.get('phase', '?'))} epoch {_esc(best.get('epoch', '?'))}), "
                    f"final {_fmt(s.get('val_accuracy_final'))}, {_fmt(s.get('total_seconds'), 1)} s</p>")
    # what a reader looks for first (the headline, curves, evaluation and worst errors), then the data,
    # and the settings and environment last, for reference
    parts = [*head, _published_section(run), "<h3>Training curves</h3>",
             _img(run["curves"], "training curves") if run["curves"] else "<p class=muted>no metrics.csv</p>"]
    parts += [_Html(_evaluation_section(e["eval"], e["plots"]) + _cam_section(e["cams"])) for e in run["evaluations"]]
    parts += [_data_section(run["data"]), _doctor_section(run["doctor"]), _timing_section(s, run["rows"]),
              _config_section(run["config"]), _environment_section(s)]
    return _Html("".join(parts))


def write_report(run_dirs: Sequence[str | Path], out: str | Path | None = None, *, progress: bool = True) -> Path:
    """Write the report; returns its path. Default: <run>/report.html for one run, ./report.html for several.
    A run is written into (its evaluation and plots kept for next time) only when no `out` is given and
    it is writable; otherwise they are made in a scratch folder, since they are inlined in the page anyway."""
    dirs = [Path(p) for p in run_dirs]
    if not dirs:
        raise RunDirError("Give at least one run directory to report on.")
    for d in dirs:  # fail before evaluating anything
        if not d.is_dir():
            raise RunDirError(f"Run directory '{d}' does not exist.")
    path = Path(out) if out is not None else (RunDir(dirs[0] if len(dirs) == 1 else ".").report_path)
    if out is None and len(dirs) == 1 and not is_writable_dir(dirs[0]):
        raise RunDirError(f"Cannot write the report into '{dirs[0]}': the run directory is read-only. Write it "
                          "elsewhere with -o FILE (nothing is then written into the run).")
    with tempfile.TemporaryDirectory(prefix="transferlab-report-") as scratch:
        runs = [_load_run(d, progress, d if out is None and is_writable_dir(d) else Path(scratch) / str(i))
                for i, d in enumerate(dirs)]
        page = _page(dirs, runs)  # reads the plots: inside the scratch folder's lifetime
    atomic_write_text(path, page)
    return path


def _page(dirs: Sequence[Path], runs: Sequence[Mapping[str, Any]]) -> str:
    labels = _labels(dirs)
    title = f"transferlab report: {labels[0]}" if len(dirs) == 1 else f"transferlab report: {len(dirs)} runs"
    from transferlab._version import __version__

    body = [f"<h1>{_esc(title)}</h1>",
            f"<p class=muted>generated {datetime.now():%Y-%m-%d %H:%M} by transferlab {_esc(__version__)}</p>"]
    if len(dirs) > 1:
        body.append("<h2>Comparison</h2>" + _comparison(runs, labels))
        body.append("<nav>" + "".join(f'<a href="#run-{i}">{_esc(lbl)}</a>' for i, lbl in enumerate(labels)) + "</nav>")
    body += [_run_section(run, label, i) for i, (run, label) in enumerate(zip(runs, labels))]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{_esc(title)}</title><style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")
