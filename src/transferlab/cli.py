"""`transferlab` command line: a thin Typer skin over transferlab.api.

    transferlab train path/to/images
    transferlab lr-find path/to/images -o runs/lr && transferlab train path/to/images --lr-finetune auto
    transferlab train data/ --backbone efficientnet_lite0 --head mlp --epochs-frozen 16 --epochs-finetune 8 \\
        --lr-head 1e-3 --lr-finetune 1e-4 --lr-decay exp:3 --augment standard --img-size 224 --out runs/ants
    transferlab predict runs/ants img1.jpg more_images/ --top-k 3 --json
    transferlab shards data/ shards/ --shard-size 1000 && transferlab train shards/ --devices 2
    transferlab models --offline --search lite
    transferlab models --search convnext --max-params 30M
    transferlab select data/ --backbones efficientnet_lite0,efficientnet_lite1,efficientnet_lite2 --budget-ms 20
    transferlab compare data/ --backbones efficientnet_lite0,efficientnet_lite2 --strategies head-only,two-stage,full --out runs/cmp
    transferlab doctor data/
    transferlab demo
    transferlab recipe list
    transferlab recipe run flowers102-resnet50 --data-root ~/datasets
    transferlab export runs/ants --format onnx --fixed-batch
    transferlab predict runs/ants/export/model.onnx photos/ --out preds.csv
    transferlab serve runs/ants --port 8000
    transferlab bench-infer runs/ants
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import sys
import typing
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from transferlab import api
from transferlab.config import DATA, HARDWARE, MODEL, OUTPUT, TRAINING, TrainConfig, field_default, option_fields
from transferlab.errors import TransferlabError
from transferlab.evaluation.doctor import DoctorOptions
from transferlab.export.bench_infer import RUNTIMES
from transferlab.export.bench_infer import bench_infer as bench_infer_run
from transferlab.export.limits import ServeLimits
from transferlab.export.onnx import DEFAULT_OPSET
from transferlab.logs import PLAIN_FORMAT, StderrHandler, progress_bar

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Transfer learning for image classification: train, predict, explore backbones.")
# Piped output (CI logs, `| less`) would otherwise be cut to 80 columns and truncate table cells.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
out_console = Console(width=None if sys.stdout.isatty() else 160)


# --help panels of the verbs' own options, beside those TrainConfig's options carry (config.PANELS).
_CANDIDATES, _CHECKS, _RANGE_TEST = "Candidates", "Checks", "Range test"
_TRAIN_VERBS, _MODEL_VERBS, _DATA_VERBS = "Train", "Use a trained model", "Data and backbones"


def _print_version(value: bool) -> None:
    if value:
        from transferlab._version import __version__

        out_console.print(f"transferlab {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                help="Print the version and exit")] = False) -> None:
    """Transfer learning for image classification: train, predict, explore backbones."""


# Every option default is written once, where the work is done, and read here: TrainConfig's fields for
# the training options, the signature of the library function (or options dataclass) a verb calls for its own.
_TRAIN = TrainConfig()
_DATA_HELP = "ImageFolder tree (train/ val/ \\[test/]), class folders, or a CSV of path,label"


def _defaults(owner) -> SimpleNamespace:
    """The keyword defaults of a function or dataclass, by name: `_defaults(api.predict).top_k`."""
    return SimpleNamespace(**{name: p.default for name, p in inspect.signature(owner).parameters.items()
                              if p.default is not p.empty})


def _config_option(f: dataclasses.Field, hint) -> inspect.Parameter:
    """The command-line option of TrainConfig field `f` (annotated `hint`): flags, help and panel from its
    `config.option` metadata, default from TrainConfig."""
    spec = f.metadata["option"]
    info = typer.Option(*spec.flags, help=spec.help, rich_help_panel=spec.panel, metavar=spec.metavar)
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=field_default(f),
                             annotation=Annotated[spec.cli_type or hint, info])


def _config_options(*names: str):
    """Decorator: the command's `**options` become one option per TrainConfig field in `names`, placed
    after its arguments (typer reads `__signature__`); the command gets them back in `options`."""
    fields, hints = {f.name: f for f in dataclasses.fields(TrainConfig)}, typing.get_type_hints(TrainConfig)

    def add(command):
        signature = inspect.signature(command, eval_str=True)
        params = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        first = [p for p in params if p.kind is not p.KEYWORD_ONLY]
        rest = [p for p in params if p.kind is p.KEYWORD_ONLY]
        generated = [_config_option(fields[name], hints[name]) for name in names]
        command.__signature__ = signature.replace(parameters=[*first, *generated, *rest])
        return command
    return add


def _as_config(options: dict) -> dict:
    """Options as TrainConfig holds them: a path option's value as text."""
    return {name: str(value) if isinstance(value, Path) else value for name, value in options.items()}


def _setup_logging(verbose: bool) -> None:
    logger = logging.getLogger("transferlab")
    if not any(getattr(h, "_transferlab_cli", False) for h in logger.handlers):
        if console.is_terminal:
            handler: logging.Handler = RichHandler(console=console, show_path=False, show_time=False, markup=False)
            handler.setFormatter(logging.Formatter("%(message)s"))
        else:  # piped or logged: plain lines, neither padded to a width nor wrapped inside a number
            handler = StderrHandler()
            handler.setFormatter(logging.Formatter(PLAIN_FORMAT))
        handler._transferlab_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    for noisy in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _report_train(result) -> None:
    s = result.summary
    # a multi-label run's accuracy columns hold its val mAP (training/objective.py)
    score, key = ("val mAP", "val_map") if s.get("task") == "multilabel" else ("val accuracy", "val_accuracy")
    console.print(
        f"[bold green]{score} {s['val_accuracy_best']:.4f}[/] (best, {s['best']['phase']} epoch "
        f"{s['best']['epoch']}; final {s['val_accuracy_final']:.4f}) in {s['total_seconds']:.0f}s — "
        f"run saved to [bold]{result.run_dir}[/]"
    )
    out_console.print(f"{key}={s['val_accuracy_best']:.4f} run_dir={result.run_dir}")


@app.command(rich_help_panel=_TRAIN_VERBS)
@_config_options(*(f.name for f in option_fields()))
def train(
    ctx: typer.Context,
    data: Annotated[Path | None, typer.Argument(help=_DATA_HELP)] = None,
    *,
    resume: Annotated[Path | None, typer.Option(help="Continue an interrupted run directory; with a larger --epochs-finetune, train a finished one longer", rich_help_panel=OUTPUT)] = None,
    allow_changed_data: Annotated[bool, typer.Option("--allow-changed-data", help="With --resume: continue even though the data changed since the run started", rich_help_panel=OUTPUT)] = False,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML of train options used as defaults (a run's config.yaml works, data included); options given on the command line win", rich_help_panel=OUTPUT)] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", metavar="KEY=VALUE", help="Set any training option by its config.yaml name (YAML value), e.g. --set head_dropout=0.3; wins over --config and the options", rich_help_panel=OUTPUT)] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    **options,
) -> None:
    """Train a classifier from a folder of labelled images (two-stage transfer learning).

    transferlab train data/
    transferlab train data/ --backbone efficientnet_lite2 -o runs/ants
    transferlab train data/ --time-budget 5m --logger csv,tensorboard
    transferlab train --resume runs/ants
    transferlab train --config runs/ants/config.yaml --set seed=1 -o runs/ants-s1
    """
    from transferlab import api
    from transferlab.config import parse_lr_finetune, parse_sets, read_options

    _setup_logging(verbose)
    sets = parse_sets(set_ or [])  # checked before any work, as the file is
    defaults = read_options(config) if config is not None else {}
    if data is None and "data" in {**defaults, **sets}:
        data = Path({**defaults, **sets}["data"])
    if resume is None and data is None:
        raise TransferlabError("Missing DATA: give a folder of images or a CSV file (or --resume RUN).")
    try:
        result = _train_or_resume(ctx, api, data, resume, allow_changed_data, _layered(ctx, defaults, sets, {
            **_as_config(options), "lr_finetune": parse_lr_finetune(options["lr_finetune"])}))
    except KeyboardInterrupt:
        # Typer would print "Aborted!"; say instead how to continue: every finished epoch is saved.
        where = resume or options["out"] or "RUN_DIR (the run directory printed at the start)"
        console.print(f"[yellow]interrupted[/] — continue with `transferlab train --resume {where}`")
        raise typer.Exit(130) from None
    if result.is_global_zero:  # one line per run, not one per process
        _report_train(result)


def _layered(ctx: typer.Context, defaults: dict, sets: dict, options: dict) -> dict:
    """The options `train` runs with: the command's defaults, then the --config file's values, then the
    options given on the command line, then --set (timm's order: a file of defaults, the command wins)."""
    def given(name: str) -> bool:
        source = ctx.get_parameter_source(name)
        return getattr(source, "name", None) == "COMMANDLINE"  # typer may carry its own copy of click's enum

    layered = {**options, **{k: v for k, v in defaults.items() if k != "data" and not given(k)}, **sets}
    layered.pop("data", None)
    return layered


def _train_or_resume(ctx: typer.Context, api, data, resume, allow_changed_data: bool, options: dict):
    """A resumed run takes its configuration from the run directory: the options given (on the command
    line, or by --config/--set with values other than the defaults) are passed on, where api.train accepts
    a larger --epochs-finetune and the options that leave the model alone, and refuses the rest."""
    if resume is not None:
        def on_command_line(name: str) -> bool:  # a value typed equal to its default still counts as given
            return getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"

        given = {k: v for k, v in options.items()
                 if hasattr(_TRAIN, k) and (on_command_line(k) or v != getattr(_TRAIN, k))}
        return api.train(data, resume=resume, allow_changed_data=allow_changed_data, **given)
    return api.train(data, **options)


# The training options the range test honours: those shaping the data, the model and the head it starts
# from, and the machinery; their help and defaults are train's.
_LR_FIND_OPTIONS = ("backbone", "pretrained", "head", "img_size", "eval_size", "epochs_frozen", "lr_head", "seed",
                    "boundary_stages", "boundary_views", "augment", "val_split", "batch_size", "num_workers",
                    "precision", "device", "cache_dir", "progress")
_LR_FIND = _defaults(api.lr_find)


@app.command("lr-find", rich_help_panel=_TRAIN_VERBS)
@_config_options(*_LR_FIND_OPTIONS)
def lr_find(
    data: Annotated[Path, typer.Argument(help=_DATA_HELP)],
    *,
    num_steps: Annotated[int, typer.Option(help="Steps of the range test (at least 10)", rich_help_panel=_RANGE_TEST)] = _LR_FIND.num_steps,
    method: Annotated[str, typer.Option(help="Suggestion rule: valley | steep | minimum", rich_help_panel=_RANGE_TEST)] = _LR_FIND.method,
    start_lr: Annotated[float, typer.Option(help="The body's LR at the first step", rich_help_panel=_RANGE_TEST)] = _LR_FIND.start_lr,
    end_lr: Annotated[float, typer.Option(help="The body's LR at the last step", rich_help_panel=_RANGE_TEST)] = _LR_FIND.end_lr,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Folder for lr_find.png and lr_find.json (default runs/lr-find-<time>)", rich_help_panel=OUTPUT)] = _LR_FIND.out,
    as_json: Annotated[bool, typer.Option("--json", help="Print lr_find.json instead of the summary", rich_help_panel=OUTPUT)] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    **options,
) -> None:
    """Suggest --lr-finetune by an LR range test, and plot the loss against the LR.

    The test runs the fine-tuning stage train runs by default: the top stages on
    the boundary cache, from the head fitted on frozen features.

    transferlab lr-find data/ -o runs/lr
    transferlab lr-find data/ --method steep --num-steps 200 --json
    """
    from transferlab import api

    _setup_logging(verbose)
    result = api.lr_find(data, num_steps=num_steps, method=method, start_lr=start_lr, end_lr=end_lr, out=out,
                         **_as_config(options))
    if as_json:
        out_console.print_json(json.dumps(result.to_dict()))
        return
    _report_lr_find(result)


def _report_lr_find(result) -> None:
    from rich.markup import escape

    setup, files = result.setup, result.files
    if result.lrs:
        low, high = min(result.losses), max(result.losses)
        stop = f", stopped early: {result.stopped}" if result.stopped else ""
        console.print(f"curve: {len(result.lrs)} steps, body LR {result.lrs[0]:.1e} → {result.lrs[-1]:.1e}, "
                      f"smoothed loss {result.losses[0]:.3f} (first) / {low:.3f} (lowest) / {high:.3f} (highest){stop}")
    else:
        console.print(f"curve: no finite loss recorded (stopped: {result.stopped})")
    if result.suggestion is None:
        console.print(f"[yellow]no suggestion[/]: the {result.method} rule found no LR where the loss falls over the "
                      "tested range; look at the plot, or try --method minimum, more --num-steps or a lower "
                      "--start-lr (train keeps its default --lr-finetune 1e-3 unless told otherwise)")
    else:
        console.print(f"[bold green]suggested --lr-finetune {result.suggestion:.2e}[/] ({result.method}; the head "
                      f"trains at {setup['head_lr_multiplier']:g}x: {setup['head_lr']:.2e})")
    console.print(f"plot → [bold]{escape(files['plot'])}[/]; curve → [bold]{escape(files['json'])}[/]")
    suggestion = "none" if result.suggestion is None else f"{result.suggestion:.3g}"
    out_console.print(f"suggestion={suggestion} method={result.method} plot={files['plot']} json={files['json']}",
                      markup=False, highlight=False, soft_wrap=True)


_SHARDS = _defaults(api.shards)


@app.command(rich_help_panel=_DATA_VERBS)
def shards(
    data: Annotated[Path, typer.Argument(help="ImageFolder tree, class folders, or a CSV of path,label")],
    out: Annotated[Path, typer.Argument(help="Output folder: OUT/train/train-000000.tar, OUT/val/*.tar, OUT/shards.json")],
    shard_size: Annotated[int, typer.Option(help="Images per shard")] = _SHARDS.shard_size,
    val_split: Annotated[float, typer.Option(help="Validation fraction when the data has no val/ folder")] = _SHARDS.val_split,
    seed: Annotated[int, typer.Option(help="Random seed (split and shuffle)")] = _SHARDS.seed,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = _SHARDS.progress,
) -> None:
    """Write a dataset as WebDataset tar shards (KEY.jpg + KEY.cls + KEY.json), split as `train` splits it.

    transferlab shards data/ shards/ --shard-size 1000
    transferlab train shards/ --devices 4
    """
    from transferlab import api

    _setup_logging(False)
    manifest = api.shards(data, out, shard_size=shard_size, val_split=val_split, seed=seed, progress=progress)
    for split, info in manifest["splits"].items():
        out_console.print(f"{split}: {info['samples']} images in {len(info['shards'])} shard(s)", highlight=False)
    out_console.print(f"classes={len(manifest['classes'])} out={out}", highlight=False)


_PREDICT = _defaults(api.predict)


@app.command(rich_help_panel=_MODEL_VERBS)
def predict(
    model: Annotated[Path, typer.Argument(help="Run directory, its model.safetensors, or an exported .onnx")],
    inputs: Annotated[list[str], typer.Argument(help="Images, folders or glob patterns")],
    top_k: Annotated[int, typer.Option(help="How many labels per image")] = _PREDICT.top_k,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table")] = False,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Stream results to a .csv or .json file instead of printing them")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass")] = _PREDICT.batch_size,
    unknown: Annotated[str | None, typer.Option(help="Answer 'unknown' (keeping the candidates) when the top probability is below a threshold: auto (chosen on val for --target-precision) or a probability")] = _PREDICT.unknown,
    target_precision: Annotated[float, typer.Option(help="--unknown auto: the precision the answered val images reach")] = _PREDICT.target_precision,
    sets: Annotated[float | None, typer.Option(help="Also give each image's conformal prediction set holding the true label with this probability (e.g. 0.9; calibrated on val)")] = _PREDICT.sets,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = _TRAIN.progress,  # the bar is the command line's: on as in train
    explain: Annotated[Path | None, typer.Option(help="Write a class-activation overlay PNG per image into this folder (a run only); --json names each")] = _PREDICT.explain,
) -> None:
    """Predict labels for images with a trained run or an exported ONNX model.

    An .onnx model runs on onnxruntime alone (no torch). Exit code 0 when every
    input was predicted, 1 when some could not be (each listed), 2 for a usage
    error.

    transferlab predict runs/ants img1.jpg more_images/ "shots/*.png" --top-k 3
    transferlab predict runs/ants/export/model.onnx photos/ --out preds.csv
    transferlab predict runs/ants photos/ --explain cams/ --json
    transferlab predict runs/ants photos/ --unknown auto --sets 0.9 --json
    """
    from rich.markup import escape

    from transferlab import api
    from transferlab.export.batch import count_inputs

    decide = {"unknown": unknown, "target_precision": target_precision, "sets": sets}
    rule = api.abstain_rule(model, **decide)  # options checked before any image is read
    if rule is not None and rule.threshold is not None:
        if rule.val_coverage is None:
            on_val = "no val scores in this model to measure it on"
        elif rule.val_precision is None:
            on_val = "no val image reaches it: every image is 'unknown'"
        else:
            on_val = f"on val {rule.val_coverage:.1%} answered, precision {rule.val_precision:.4f}"
        console.print(f"unknown below top probability {rule.threshold:.4f} ({escape(on_val)})")

    failures: list[dict] = []
    with progress_bar(progress, "predicting", lambda: count_inputs(inputs)) as advance:
        def seen(entry: dict) -> None:
            advance()
            if "error" in entry:
                failures.append(entry)

        if out is not None:
            counts = api.predict_to_file(model, inputs, out, top_k=top_k, batch_size=batch_size, on_entry=seen,
                                         explain=explain, **decide)
        else:
            results = api.predict(model, inputs, top_k=top_k, batch_size=batch_size, on_entry=seen,
                                  explain=explain, **decide)
    if out is not None:
        for r in failures[:10]:
            console.print(f"[yellow]failed[/] {escape(r['path'])}: {escape(r['error'])}")
        if len(failures) > 10:
            console.print(f"[yellow]… {len(failures) - 10} more failures (see the file's error column)[/]")
        out_console.print(f"predictions={counts['images'] - counts['failed']} failed={counts['failed']} out={out}",
                          markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1 if failures else 0)
    if as_json:
        out_console.print_json(json.dumps(results))
        raise typer.Exit(1 if failures else 0)
    table = Table(title=f"predictions ({len(results) - len(failures)} images, {len(failures)} failed)")
    table.add_column("image", overflow="fold")
    multi = any("labels" in r for r in results)  # a multi-label model: its decision first
    if multi:
        table.add_column("labels (above their thresholds)")
    table.add_column("top predictions")
    if unknown is not None:
        table.add_column("answer")
    if sets is not None:
        table.add_column(f"{sets:.0%} set")

    def listed(labels: list[dict]) -> str:
        return ", ".join(f"{escape(p['label'])} {p['probability']:.3f}" for p in labels) or "—"

    for r in results:
        if "error" in r:
            text = [*([""] if multi else []), f"[red]error: {escape(r['error'])}[/]"]
        else:
            text = [*([listed(r["labels"])] if multi else []), listed(r["predictions"])]
        decided = ([f"[yellow]{escape(r['label'])}[/]" if r.get("abstained") else escape(r.get("label", ""))]
                   if unknown is not None else []) + ([escape(", ".join(r.get("set", [])))] if sets is not None else [])
        table.add_row(escape(r["path"]), *text, *decided)
    out_console.print(table)
    if explain is not None:
        console.print(f"class-activation overlays → [bold]{escape(str(explain))}[/]")
    raise typer.Exit(1 if failures else 0)  # 1: some inputs could not be used (each one listed above)


_MODELS = _defaults(api.list_models)
MODEL_ROWS = 50  # `models` rows a terminal shows before it says how many more match; --json has all

@app.command(rich_help_panel=_DATA_VERBS)
def models(
    search: Annotated[str | None, typer.Option(help="Substring or wildcard filter")] = _MODELS.search,
    offline: Annotated[bool, typer.Option("--offline", help="Only backbones whose weights are usable now")] = _MODELS.offline_only,
    max_params: Annotated[str | None, typer.Option(help="At most this many parameters: 30M, 5e6, 500k")] = _MODELS.max_params,
    max_gflops: Annotated[float | None, typer.Option(help="At most this many GFLOPs (multiply-adds) at the input size")] = _MODELS.max_gflops,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    limit: Annotated[int, typer.Option(help="Show at most N rows")] = MODEL_ROWS,
) -> None:
    """List pretrained backbones: size, GFLOPs, input, head, feature dim, ImageNet top-1, offline use.

    transferlab models --offline
    transferlab models --search convnext --max-params 30M
    transferlab models --search "tv:*" --max-gflops 1 --json
    """
    from transferlab import api
    from transferlab.models.catalog import format_count

    _setup_logging(False)
    rows = api.list_models(search, offline_only=offline, max_params=max_params, max_gflops=max_gflops)
    if as_json:
        out_console.print_json(json.dumps(rows))
        return
    table = Table(title=f"backbones ({len(rows)} match{'es' if len(rows) != 1 else ''})")
    for col in ("name", "source", "params", "GFLOPs", "input", "head", "feat dim", "top-1", "offline"):
        table.add_column(col, justify="right" if col in ("params", "GFLOPs", "input", "feat dim", "top-1") else "left")
    for r in rows[:limit]:
        table.add_row(r["name"], r["source"], format_count(r["params"]),
                      "" if r["gflops"] is None else f"{r['gflops']:.2f}", str(r.get("input_size", "")),
                      r["head"] or "", "" if r["feature_dim"] is None else str(r["feature_dim"]),
                      "" if r["top1"] is None else f"{r['top1']:.2f}", "yes" if r.get("offline") else "no")
    out_console.print(table)
    if len(rows) > limit:
        console.print(f"… {len(rows) - limit} more; narrow with --search or raise --limit")
    if any(r["params"] is None for r in rows[:limit]):
        console.print("[dim]blank params/GFLOPs: not published and not measured for this many rows; "
                      "narrow with --search to measure them (cached afterwards)[/]")


@app.command(rich_help_panel=_TRAIN_VERBS)
def demo(
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run directory")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """The main job on the embedded default: EfficientNet-Lite0 (offline weights) on scikit-learn's digits.

    transferlab demo
    transferlab demo -o runs/demo
    """
    from transferlab import api

    _setup_logging(verbose)
    console.print("[bold]demo:[/] EfficientNet-Lite0 (ImageNet weights shipped offline) on scikit-learn's "
                  "handwritten digits (1 797 images, 10 classes)")
    _report_train(api.demo(out=out))


PER_CLASS_ROWS = 40  # above this many classes the terminal shows the worst ones; the JSON has all


def _eval_tables(result) -> list[Table]:
    from rich.markup import escape

    if result.multilabel:
        return _multilabel_tables(result)
    m, t = result.metrics, result.tta_metrics
    overall = Table(title=f"{escape(result.name)}: {m['n']} images, {len(result.skipped)} skipped")
    overall.add_column("metric")
    overall.add_column("value", justify="right")
    if t:
        overall.add_column("with TTA", justify="right")
    rows = [("accuracy", "accuracy"), (f"top-{m['top_k']} accuracy", "top_k_accuracy"),
            ("balanced accuracy", "balanced_accuracy"), ("log loss", "log_loss"), ("ECE (15 bins)", "ece")]
    for label, key in rows:
        overall.add_row(label, f"{m[key]:.4f}", *([f"{t[key]:.4f}"] if t else []))
    for avg in ("macro", "weighted"):
        overall.add_row(f"{avg} F1", f"{m[avg]['f1']:.4f}", *([f"{t[avg]['f1']:.4f}"] if t else []))

    per_class = m["per_class"]
    shown = per_class if len(per_class) <= PER_CLASS_ROWS else sorted(per_class, key=lambda r: r["f1"])[:PER_CLASS_ROWS]
    title = "per class" if shown is per_class else f"per class: the {PER_CLASS_ROWS} lowest F1 of {len(per_class)}"
    table = Table(title=title)
    for col in ("class", "precision", "recall", "F1", "support"):
        table.add_column(col, justify="left" if col == "class" else "right")
    if t:
        table.add_column("recall with TTA", justify="right")
    tta_rows = {r["class"]: r for r in t["per_class"]} if t else {}
    for r in shown:
        table.add_row(escape(r["class"]), f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}",
                      str(r["support"]), *([f"{tta_rows[r['class']]['recall']:.3f}"] if t else []))
    tables = [overall, table, *_calibration_tables(m)]
    confused = result.interpretation["most_confused"][:5]
    if confused:
        pairs = Table(title="most confused")
        for col in ("true", "predicted as", "images"):
            pairs.add_column(col, justify="right" if col == "images" else "left")
        for c in confused:
            pairs.add_row(escape(c["true"]), escape(c["predicted"]), str(c["count"]))
        tables.append(pairs)
    return tables


def _calibration_tables(m: dict) -> list[Table]:
    """Before/after temperature scaling, and what --unknown auto and --sets achieve on this data."""
    cal, sel = m.get("calibration"), m.get("selective") or {}
    tables = []
    if cal:
        table = Table(title=f"calibration: temperature T = {cal['temperature']:.4f}")
        for col in ("metric", "before (T = 1)", "after"):
            table.add_column(col, justify="left" if col == "metric" else "right")
        table.add_row("log loss", f"{cal['log_loss_before']:.4f}", f"{m['log_loss']:.4f}")
        table.add_row("ECE (15 bins)", f"{cal['ece_before']:.4f}", f"{m['ece']:.4f}")
        tables.append(table)
    auto, sets = sel.get("unknown_auto"), sel.get("sets")
    if auto and sets:
        table = Table(title="abstain and prediction sets (thresholds from val)")
        for col in ("rule", "coverage", "precision / mean set size"):
            table.add_column(col, justify="left" if col == "rule" else "right")
        precision = "—" if auto["precision"] is None else f"{auto['precision']:.4f}"
        table.add_row(f"--unknown auto (target precision {auto['target_precision']})", f"{auto['coverage']:.4f}",
                      precision)
        table.add_row(f"--sets {sets['target_coverage']} ({sets['score']})", f"{sets['coverage']:.4f}",
                      f"{sets['mean_size']:.2f}")
        tables.append(table)
    return tables


def _multilabel_tables(result) -> list[Table]:
    """A multi-label evaluation: the headline metrics, then precision/recall/F1/AP/threshold per label."""
    from rich.markup import escape

    m = result.metrics
    overall = Table(title=f"{escape(result.name)}: {m['n']} images, {len(result.skipped)} skipped (multi-label)")
    overall.add_column("metric")
    overall.add_column("value", justify="right")
    for label, value in (("mAP (macro AP)", m["map"]), ("micro F1", m["micro"]["f1"]), ("macro F1", m["macro"]["f1"]),
                         ("subset accuracy (exact match)", m["subset_accuracy"]),
                         ("hamming accuracy", m["hamming_accuracy"]), ("log loss (BCE)", m["log_loss"]),
                         ("labels per image (true)", m["label_cardinality"]),
                         ("labels per image (predicted)", m["predicted_cardinality"])):
        overall.add_row(label, f"{value:.4f}")
    rows = m["per_label"]
    shown = rows if len(rows) <= PER_CLASS_ROWS else sorted(rows, key=lambda r: r["f1"])[:PER_CLASS_ROWS]
    table = Table(title="per label" if shown is rows else f"per label: the {PER_CLASS_ROWS} lowest F1 of {len(rows)}")
    for col in ("label", "precision", "recall", "F1", "AP", "threshold", "support"):
        table.add_column(col, justify="left" if col == "label" else "right")
    for r in shown:
        table.add_row(escape(r["label"]), f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}",
                      "—" if r["ap"] is None else f"{r['ap']:.3f}", f"{r['threshold']:.3f}", str(r["support"]))
    return [overall, table]


_EVALUATE = _defaults(api.evaluate)


@app.command(rich_help_panel=_MODEL_VERBS)
def evaluate(
    run: Annotated[Path, typer.Argument(help="Run directory")],
    data: Annotated[Path | None, typer.Argument(help="Labelled images: ImageFolder tree, class folders or CSV (default: the run's own data, split as in training)")] = None,
    split: Annotated[str, typer.Option(help="val | test | train: split of the run's data, or DATA's train/ val/ test/ folder")] = _EVALUATE.split,
    tta: Annotated[bool, typer.Option("--tta", help="Also score with test-time augmentation (flip × full/centre crop)")] = _EVALUATE.tta,
    top_losses: Annotated[int, typer.Option(help="How many worst-predicted images to keep")] = _EVALUATE.top_losses,
    batch_size: Annotated[int, typer.Option(help="Batch size")] = _EVALUATE.batch_size,
    as_json: Annotated[bool, typer.Option("--json", help="Print the evaluation JSON instead of tables")] = False,
    calibrate: Annotated[bool | None, typer.Option("--calibrate/--no-calibrate", help="Refit the temperature (and the val scores --unknown/--sets use) on the run's val split and store it in model.json; --no-calibrate resets T to 1")] = _EVALUATE.calibrate,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = _EVALUATE.progress,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Metrics, calibration and worst errors of a trained run on labelled data (saved as eval-<name>.json).

    transferlab evaluate runs/ants                    # the run's own val split
    transferlab evaluate runs/ants new_photos/ --tta  # any labelled folder/CSV
    transferlab evaluate runs/ants data/ --split test --top-losses 32
    transferlab evaluate runs/old --calibrate         # calibrate an older run
    """
    from rich.markup import escape

    from transferlab import api

    _setup_logging(verbose)
    result = api.evaluate(run, data, split=split, tta=tta, top_losses=top_losses, batch_size=batch_size,
                          progress=progress, calibrate=calibrate)
    if as_json:
        out_console.print_json(json.dumps(result.to_dict()))
        return
    for table in _eval_tables(result):
        out_console.print(table)
    for s in result.skipped[:10]:
        console.print(f"[yellow]skipped[/] {escape(s['path'])}: {escape(s['reason'])}")
    if len(result.skipped) > 10:
        console.print(f"[yellow]… {len(result.skipped) - 10} more skipped files (see the JSON)[/]")
    plots_dir = result.run_dir / f"eval-{result.name}"
    console.print(f"metrics → [bold]{escape(str(result.json_path))}[/]; plots → [bold]{escape(str(plots_dir))}/[/]")
    tta_part = f" tta_accuracy={result.tta_metrics['accuracy']:.4f}" if result.tta_metrics else ""
    if result.multilabel:
        m = result.metrics
        tta_part = (f" map={m['map']:.4f} micro_f1={m['micro']['f1']:.4f} macro_f1={m['macro']['f1']:.4f}"
                    f" subset_accuracy={m['subset_accuracy']:.4f}")
    out_console.print(f"accuracy={result.accuracy:.4f}{tta_part} json={result.json_path}", markup=False,
                      highlight=False, soft_wrap=True)


_REPORT = _defaults(api.report)


@app.command(rich_help_panel=_MODEL_VERBS)
def report(
    runs: Annotated[list[Path], typer.Argument(help="One or more run directories (several: a comparison)")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="HTML file (default: RUN/report.html for one run, ./report.html for several)")] = _REPORT.out,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = _REPORT.progress,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """One self-contained HTML page (images inline, no scripts) for one run or comparing several.

    transferlab report runs/ants
    transferlab report runs/ants runs/ants-mlp runs/ants-full -o compare.html
    """
    from rich.markup import escape

    from transferlab import api

    _setup_logging(verbose)
    path = api.report(runs, out, progress=progress)
    console.print(f"report → [bold]{escape(str(path))}[/]")
    out_console.print(f"report={path}", markup=False, highlight=False, soft_wrap=True)


def _selection_table(result) -> Table:
    from rich.markup import escape

    from transferlab.models.catalog import format_count

    budget = f", budget {result.budget_ms:g} ms" if result.budget_ms is not None else ""
    table = Table(title=f"backbone selection: linear probe on frozen features{budget}")
    columns = ("#", "backbone", "probe val acc", "CV acc", "C", "ms b1", "ms b32", "img/s b32", "peak MiB",
               "params", "GFLOPs", "extract s", "pareto", "budget")
    for col in columns:
        table.add_column(col, justify="left" if col in ("backbone", "pareto", "budget") else "right")
    for r in result.rows:
        name = escape(r["backbone"]) + (" ★" if r["recommended"] else "")
        table.add_row(
            str(r["rank"]), f"[bold]{name}[/]" if r["recommended"] else name, f"{r['probe_accuracy']:.4f}",
            "—" if r["cv_accuracy"] is None else f"{r['cv_accuracy']:.4f}", f"{r['probe_c']:g}",
            f"{r['latency_ms_b1']:.1f}", f"{r['latency_ms_b32']:.1f}", f"{r['images_per_second']:.1f}",
            f"{r['peak_mem_mb']:.0f}", format_count(r["params"]), f"{r['gflops']:.2f}",
            f"{r['extract_seconds']:.1f}" + (" (cache)" if r["features_cached"] else ""),
            "yes" if r["pareto"] else "", "ok" if r["within_budget"] else "over")
    return table


# select probes the candidates on the data as train would read it (its features feed train's cache).
@app.command(rich_help_panel=_DATA_VERBS)
def select(
    data: Annotated[Path, typer.Argument(help=_DATA_HELP)],
    backbones: Annotated[str | None, typer.Option(help="Comma-separated candidates (e.g. efficientnet_lite0,resnet50)", rich_help_panel=_CANDIDATES)] = None,
    max_params: Annotated[str | None, typer.Option(help="Candidates from the catalog with at most this many parameters (30M, 5e6)", rich_help_panel=_CANDIDATES)] = None,
    search: Annotated[str | None, typer.Option(help="Candidates from the catalog matching this substring or wildcard", rich_help_panel=_CANDIDATES)] = None,
    budget_ms: Annotated[float | None, typer.Option(help="Latency budget at batch 1 (ms) for the recommendation", rich_help_panel=_CANDIDATES)] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (default runs/select-<time>)", rich_help_panel=OUTPUT)] = None,
    pretrained: Annotated[bool, typer.Option("--pretrained/--no-pretrained", help="Load pretrained weights", rich_help_panel=_CANDIDATES)] = _TRAIN.pretrained,
    img_size: Annotated[int | None, typer.Option(help="Input size (default: each backbone's)", rich_help_panel=_CANDIDATES)] = None,
    val_split: Annotated[float, typer.Option(help="Validation fraction when the data has no val/ folder", rich_help_panel=DATA)] = _TRAIN.val_split,
    seed: Annotated[int, typer.Option(help="Random seed", rich_help_panel=DATA)] = _TRAIN.seed,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | mps", rich_help_panel=HARDWARE)] = _TRAIN.device,
    as_json: Annotated[bool, typer.Option("--json", help="Print selection.json instead of the table", rich_help_panel=OUTPUT)] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", rich_help_panel=OUTPUT)] = _TRAIN.progress,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Rank backbones on your data by a linear probe on frozen features.

    One forward pass per image (cached for training), with latency and memory on
    this machine; recommends the best within a latency budget.

    transferlab select data/ --budget-ms 20 \\
        --backbones efficientnet_lite0,efficientnet_lite1,efficientnet_lite2
    transferlab select data/ --max-params 30M --search convnext --out runs/choose
    """
    from rich.markup import escape

    from transferlab import api

    _setup_logging(verbose)
    result = api.select(data, backbones, max_params=max_params, search=search, budget_ms=budget_ms, out=out,
                        pretrained=pretrained, img_size=img_size, val_split=val_split, seed=seed, device=device,
                        progress=progress)
    if as_json:
        out_console.print_json(result.files["json"].read_text(encoding="utf-8"))
        return
    out_console.print(_selection_table(result))
    s = result.seconds
    out_console.print(f"recommended: {escape(result.reason)}", highlight=False)
    if s["ratio"] is None:
        out_console.print(f"select took {s['total']:.1f} s; every feature came from the cache (no forward pass "
                          "over the images)", highlight=False)
    else:
        out_console.print(
            f"select took {s['total']:.1f} s = {s['ratio']:.2f} × its feature extraction ({s['feature_extraction']:.1f} s, "
            f"one forward pass per image per backbone); probes {s['probes']:.1f} s, latency/memory benchmark "
            f"{s['benchmark']:.1f} s, other {s['other']:.1f} s (image checks, model builds, plots); "
            f"library imports before that {s['imports']:.1f} s "
            f"(with them: {(s['total'] + s['imports']) / s['feature_extraction']:.2f} ×)",
            highlight=False)
    console.print(f"files → [bold]{escape(str(result.out_dir))}[/] (selection.csv, selection.json, selection.png, "
                  "learning_curve.png)")


def _doctor_tables(result) -> list[Table]:
    """A summary (findings per kind) and, for each kind found, its worst `options.top` findings."""
    from rich.markup import escape

    from transferlab.evaluation.doctor import CHECKS

    def short(path: str) -> str:
        try:
            return Path(path).relative_to(result.root).as_posix()
        except ValueError:
            return path

    counts = result.counts
    summary = Table(title=f"data doctor: {sum(sum(c.values()) for c in counts.values())} images, "
                          f"{len(result.classes)} classes ({escape(result.backbone)} features"
                          f"{', from the cache' if result.features_cached else ''})")
    summary.add_column("check")
    summary.add_column("findings", justify="right")
    summary.add_column("score")
    found = result.summary()
    for kind, check in CHECKS.items():
        summary.add_row(check.title, str(found[kind]), check.score)
    tables = [summary]
    for kind, check in CHECKS.items():
        findings = result.of_kind(kind)
        if not findings:
            continue
        shown = findings[:result.options.top]
        table = Table(title=f"{check.title}: {len(shown)} of {len(findings)}")
        for name in ("class" if kind == "class_imbalance" else "image", "score", "other image / suggested label",
                     "detail"):
            table.add_column(name, justify="right" if name == "score" else "left", overflow="fold")
        for f in shown:
            table.add_row(escape(f.label if kind == "class_imbalance" else short(f.path)), f"{f.score:.3f}",
                          escape(short(f.partner) if f.partner else f.suggested_label), escape(f.detail))
        tables.append(table)
    return tables


_DOCTOR, _CHECKS_AT = _defaults(api.doctor), _defaults(DoctorOptions)


@app.command(rich_help_panel=_DATA_VERBS)
def doctor(
    data: Annotated[Path, typer.Argument(help="ImageFolder tree (train/ val/ \\[test/]), class folders, a CSV of path,label, or a run directory (its data and settings)")],
    backbone: Annotated[str | None, typer.Option(help=f"Backbone whose frozen features describe the images (default: train's, {_TRAIN.backbone})", rich_help_panel=MODEL)] = None,
    pretrained: Annotated[bool | None, typer.Option("--pretrained/--no-pretrained", help=f"Pretrained weights (default: {'yes' if _TRAIN.pretrained else 'no'})", rich_help_panel=MODEL)] = None,
    img_size: Annotated[int | None, typer.Option(help="As train's --img-size (default: the backbone's)", rich_help_panel=MODEL)] = None,
    eval_size: Annotated[int | None, typer.Option(help="As train's --eval-size: the size features are extracted at", rich_help_panel=MODEL)] = None,
    val_split: Annotated[float | None, typer.Option(help=f"Validation fraction when the data has no val/ folder (default {_TRAIN.val_split})", rich_help_panel=DATA)] = None,
    seed: Annotated[int | None, typer.Option(help=f"Random seed of the split and the probe (default {_TRAIN.seed})", rich_help_panel=DATA)] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda | mps", rich_help_panel=HARDWARE)] = None,
    precision: Annotated[str | None, typer.Option(help="auto | 32-true | bf16-mixed | 16-mixed", rich_help_panel=HARDWARE)] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Feature cache directory (default: train's)", rich_help_panel=HARDWARE)] = None,
    similarity: Annotated[float, typer.Option(help="Near-duplicates: cosine similarity of the embeddings at or above this", rich_help_panel=_CHECKS)] = _CHECKS_AT.similarity,
    folds: Annotated[int, typer.Option(help="Label issues: folds of the out-of-fold probe", rich_help_panel=_CHECKS)] = _CHECKS_AT.folds,
    imbalance: Annotated[float, typer.Option(help="Class imbalance: a class with under this fraction of the largest class's images", rich_help_panel=_CHECKS)] = _CHECKS_AT.imbalance,
    outlier_z: Annotated[float, typer.Option(help="Size outliers: robust z-score of log area or log aspect above this", rich_help_panel=_CHECKS)] = _CHECKS_AT.outlier_z,
    top: Annotated[int, typer.Option(help="Findings shown per kind (the CSV has all)", rich_help_panel=_CHECKS)] = _CHECKS_AT.top,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (default runs/doctor-<time>; a run: RUN/doctor)", rich_help_panel=OUTPUT)] = _DOCTOR.out,
    as_json: Annotated[bool, typer.Option("--json", help="Print doctor.json instead of the tables", rich_help_panel=OUTPUT)] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", rich_help_panel=OUTPUT)] = _DOCTOR.progress,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Find what is wrong with a dataset before a model learns it.

    Unreadable files, exact and near-duplicate images (within and across splits),
    likely mislabelled images, class imbalance, odd sizes. Seconds on data `train`
    has seen (its cached features); else one forward pass, cached for `train`.

    transferlab doctor data/
    transferlab doctor data/ --backbone resnet50 --similarity 0.95 -o runs/doc
    transferlab doctor runs/ants    # a run's data, backbone and settings
    """
    from rich.markup import escape

    from transferlab import api

    _setup_logging(verbose)
    given = {"backbone": backbone, "pretrained": pretrained, "img_size": img_size, "eval_size": eval_size,
             "val_split": val_split, "seed": seed, "device": device, "precision": precision,
             "cache_dir": None if cache_dir is None else str(cache_dir)}
    options = {k: v for k, v in given.items() if v is not None}
    result = api.doctor(data, similarity=similarity, folds=folds, imbalance=imbalance, outlier_z=outlier_z, top=top,
                        out=out, progress=progress, **options)
    if as_json:
        out_console.print_json(result.files["json"].read_text(encoding="utf-8"))
        return
    for table in _doctor_tables(result):
        out_console.print(table)
    s = result.seconds
    console.print(f"doctor took {s['total']:.1f} s (features {s['features']:.1f} s, "
                  f"{'from the cache' if result.features_cached else 'extracted and cached'}); findings → "
                  f"[bold]{escape(str(result.files['csv']))}[/], {escape(result.files['json'].name)} beside it")
    out_console.print(" ".join(f"{k}={n}" for k, n in result.summary().items()) + f" csv={result.files['csv']}",
                      markup=False, highlight=False, soft_wrap=True)


def _compare_table(result) -> Table:
    from rich.markup import escape

    from transferlab.models.catalog import format_count

    def num(value, fmt: str) -> str:
        return "—" if value is None else format(value, fmt)

    best = result.best
    table = Table(title=f"comparison: {len(result.rows)} runs")
    columns = ("backbone", "strategy", "acc after FE", "acc after FT", "best", "train s", "ms b1", "peak train MiB",
               "peak infer MiB", "params", "this time")
    for col in columns:
        table.add_column(col, justify="left" if col in ("backbone", "strategy", "this time") else "right")
    for r in result.rows:
        mark = "[bold green]" if r is best else ""
        table.add_row(escape(r["backbone"]), r["strategy"], num(r["val_accuracy_feature_extraction"], ".4f"),
                      num(r["val_accuracy_finetune"], ".4f"), f"{mark}{r['val_accuracy_best']:.4f}",
                      num(r["train_seconds"], ".1f"), num(r["latency_ms_b1"], ".1f"), num(r["peak_train_mem_mb"], ".0f"),
                      num(r["peak_infer_mem_mb"], ".0f"), format_count(r["params"]), r["status"])
    return table


_COMPARE = _defaults(api.compare)


@app.command(rich_help_panel=_TRAIN_VERBS)
def compare(
    data: Annotated[Path, typer.Argument(help=_DATA_HELP)],
    backbones: Annotated[str, typer.Option(help="Comma-separated backbones (e.g. efficientnet_lite0,resnet50)", rich_help_panel=_CANDIDATES)],
    strategies: Annotated[str, typer.Option(help="Comma-separated, from: head-only, two-stage, full, scratch", rich_help_panel=_CANDIDATES)] = ",".join(_COMPARE.strategies),
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder; re-run with the same one to skip finished runs and resume interrupted ones (default runs/compare-<time>)", rich_help_panel=OUTPUT)] = None,
    epochs_frozen: Annotated[int | None, typer.Option(help="Head epochs on cached frozen features", rich_help_panel=TRAINING)] = None,
    epochs_finetune: Annotated[int | None, typer.Option(help="Fine-tuning epochs", rich_help_panel=TRAINING)] = None,
    img_size: Annotated[int | None, typer.Option(help="Input size (default: each backbone's)", rich_help_panel=_CANDIDATES)] = None,
    pretrained: Annotated[bool, typer.Option("--pretrained/--no-pretrained", help="Load pretrained weights", rich_help_panel=_CANDIDATES)] = _TRAIN.pretrained,
    batch_size: Annotated[int | None, typer.Option(help="Batch size", rich_help_panel=TRAINING)] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed", rich_help_panel=TRAINING)] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | mps", rich_help_panel=HARDWARE)] = _TRAIN.device,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", rich_help_panel=OUTPUT)] = _TRAIN.progress,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Train every backbone × strategy and compare them: one table, plots and a self-contained compare.html.

    transferlab compare data/ --backbones efficientnet_lite0,efficientnet_lite2 \\
        --strategies head-only,two-stage,full -o runs/cmp
    transferlab compare data/ --backbones efficientnet_lite0 \\
        --strategies two-stage,scratch --epochs-finetune 8 -o runs/cmp
    """
    from rich.markup import escape

    from transferlab import api

    _setup_logging(verbose)
    given = {"epochs_frozen": epochs_frozen, "epochs_finetune": epochs_finetune, "img_size": img_size,
             "batch_size": batch_size, "seed": seed}
    options = {k: v for k, v in given.items() if v is not None}
    result = api.compare(data, backbones, strategies, out=out, pretrained=pretrained, device=device,
                         progress=progress, **options)
    out_console.print(_compare_table(result))
    console.print(f"compare.html, compare.csv, compare.json → [bold]{escape(str(result.out_dir))}[/]")
    out_console.print(f"best={result.best['backbone']}×{result.best['strategy']} "
                      f"val_accuracy={result.best['val_accuracy_best']:.4f} html={result.files['html']}",
                      markup=False, highlight=False, soft_wrap=True)


recipe_app = typer.Typer(no_args_is_help=True, help="The classic experiments as one-command recipes (list, show, run).")
app.add_typer(recipe_app, name="recipe", rich_help_panel=_TRAIN_VERBS)

_OVERRIDE_HELP = "key=value, repeatable: any train option (epochs_finetune=1, preprocess.crop_pct=1), backbones=a,b"


@recipe_app.command("list")
def recipe_list() -> None:
    """The shipped recipes.

    transferlab recipe list
    transferlab recipe show flowers102-resnet50
    """
    from rich.markup import escape

    from transferlab import api

    table = Table(title="recipes")
    for col in ("name", "kind", "dataset", "backbone(s)", "published"):
        table.add_column(col)
    for r in api.recipes():
        what = r.config.get("backbone", "") if r.kind == "train" else str(r.compare.get("backbones", ""))
        table.add_row(escape(r.name), r.kind, r.dataset["name"], escape(what), str(len(r.published)) + " figure(s)")
    out_console.print(table)


@recipe_app.command("show")
def recipe_show(
    name: Annotated[str, typer.Argument(help="Recipe name (see `transferlab recipe list`) or a recipe .yaml")],
    override: Annotated[list[str] | None, typer.Option("--override", help=_OVERRIDE_HELP)] = None,
) -> None:
    """The resolved settings, dataset and source figures of a recipe.

    transferlab recipe show flowers102-resnet50 --override epochs_finetune=4
    """
    from transferlab import api
    from transferlab.workflows.recipe import describe

    out_console.print(describe(api.recipe_show(name, override or [])), markup=False, highlight=False, soft_wrap=True)


_RECIPE = _defaults(api.recipe_run)


@recipe_app.command("run")
def recipe_run(
    name: Annotated[str, typer.Argument(help="Recipe name (see `transferlab recipe list`) or a recipe .yaml")],
    data_root: Annotated[Path | None, typer.Option(help="Folder holding (or to receive) the dataset in its official layout (default: datasets/ in $TRANSFERLAB_HOME)")] = _RECIPE.data_root,
    override: Annotated[list[str] | None, typer.Option("--override", help=_OVERRIDE_HELP)] = None,
    pretrained: Annotated[bool, typer.Option("--pretrained/--no-pretrained", help="Load pretrained weights")] = _TRAIN.pretrained,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run directory (compare recipes: output folder; default runs/<recipe>-<time>)")] = _RECIPE.out,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | mps")] = _RECIPE.device,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = _RECIPE.progress,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run a recipe: dataset (downloaded through torchvision when missing and online), then train or compare.

    transferlab recipe run flowers102-resnet50 --data-root ~/datasets
    transferlab recipe run retraining-benchmark \\
        --override backbones=tv:resnet18,tv:alexnet
    """
    from rich.markup import escape

    from transferlab import api

    _setup_logging(verbose)
    if out is not None and "=" in out.name and not out.exists():  # -o was --override here before it meant --out
        raise TransferlabError(f"-o is --out (the run directory) in every command; '{out}' looks like a setting: "
                               f"pass it as --override {out}")
    overrides = list(override or []) + ([] if pretrained else ["pretrained=false"])
    result = api.recipe_run(name, data_root=data_root, overrides=overrides, out=out, device=device, progress=progress)
    table = Table(title=f"{result.recipe.name}: this run vs published (val accuracy)")
    for col in ("figure", "published", "this run", ""):
        table.add_column(col, justify="right" if col == "this run" else "left")
    for row in result.versus:
        value = "—" if row["this_run"] is None else f"{100 * row['this_run']:.1f} %"
        verdict = {True: "within", False: "outside", None: ""}[row["within"]]
        if row.get("delta") is not None:
            verdict = f"{100 * row['delta']:+.1f} pts"
        table.add_row(escape(row["label"]), row["published"], value, verdict)
    if result.versus:
        out_console.print(table)
    else:
        console.print("the source publishes no figure to compare with")
    console.print(f"run → [bold]{escape(str(result.out_dir))}[/] (`transferlab report` shows it beside the source figures)")
    out_console.print(f"recipe={result.recipe.name} out={result.out_dir}", markup=False, highlight=False, soft_wrap=True)


_EXPORT = _defaults(api.export_model)


@app.command(rich_help_panel=_MODEL_VERBS)
def export(
    run: Annotated[Path, typer.Argument(help="Run directory (or its model.safetensors)")],
    format: Annotated[str, typer.Option("--format", "-f", help="onnx | torchscript")] = _EXPORT.format,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Model file (default: model.onnx, model-fp16.onnx or model.pt in RUN/export); metadata goes to FILE.json")] = _EXPORT.out,
    dynamic_batch: Annotated[bool, typer.Option("--dynamic-batch/--fixed-batch", help="Any batch size (default), or a fixed batch of 1: the edge/mobile shape some runtimes need")] = _EXPORT.dynamic_batch,
    fp16: Annotated[bool, typer.Option("--fp16", help="Half-precision weights and arithmetic (fp32 input/output; parity tolerance 1e-2)")] = _EXPORT.fp16,
    opset: Annotated[int | None, typer.Option(help=f"ONNX opset (default {DEFAULT_OPSET})")] = _EXPORT.opset,
    parity_images: Annotated[int, typer.Option(help="Validation images the parity check runs on")] = _EXPORT.parity_images,
    as_json: Annotated[bool, typer.Option("--json", help="Print the sidecar JSON")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Export a trained run to ONNX or TorchScript, with its preprocessing metadata.

    Written only after proving parity with PyTorch on real validation images
    (max |Δ probability| ≤ 1e-4 in fp32, identical top-1); fails otherwise.

    transferlab export runs/ants
    transferlab export runs/ants --format torchscript -o deploy/ants.pt
    """
    from rich.markup import escape

    from transferlab import api

    _setup_logging(verbose)
    result = api.export_model(run, format, out=out, dynamic_batch=dynamic_batch, fp16=fp16, opset=opset,
                              parity_images=parity_images)
    if as_json:
        out_console.print_json(json.dumps(result.metadata))
        return
    p = result.parity
    size_mb = result.path.stat().st_size / 2**20
    console.print(f"[bold green]{result.format}[/] ({result.metadata['precision']}, batch "
                  f"{'dynamic' if dynamic_batch else 1}) → [bold]{escape(str(result.path))}[/] ({size_mb:.1f} MB) "
                  f"+ {escape(result.sidecar.name)} in {result.seconds:.1f}s")
    console.print(f"parity vs PyTorch: max |Δ probability| {p['max_abs_diff']:.2e} ≤ {p['tolerance']:.0e}, top-1 "
                  f"identical {p['top1_identical']}/{p['images']} ({escape(p['source'])}; batch "
                  f"{', '.join(map(str, p['batch_sizes']))})")
    out_console.print(f"export={result.path} parity_max_abs_diff={p['max_abs_diff']:.3g} "
                      f"top1_identical={p['top1_identical']}/{p['images']}", markup=False, highlight=False,
                      soft_wrap=True)


_SERVE, _LIMITS = _defaults(api.serve), _defaults(ServeLimits)


@app.command(rich_help_panel=_MODEL_VERBS)
def serve(
    model: Annotated[Path, typer.Argument(help="Run directory, its model.safetensors, or an exported .onnx")],
    host: Annotated[str, typer.Option(help="Interface to bind (0.0.0.0: every interface, no authentication)")] = _SERVE.host,
    port: Annotated[int, typer.Option(help="TCP port")] = _SERVE.port,
    top_k: Annotated[int, typer.Option(help="Labels per image unless the request says ?top_k=N")] = _LIMITS.top_k,
    max_upload_mb: Annotated[float, typer.Option(help="Largest request body (413 above)")] = _LIMITS.max_upload_mb,
    max_files: Annotated[int, typer.Option(help="Most images per request")] = _LIMITS.max_files,
    max_pixels: Annotated[int, typer.Option(help="Most pixels per image, checked before decoding (413 above)")] = _LIMITS.max_pixels,
    max_batch: Annotated[int, typer.Option(help="Most images per forward pass (concurrent requests share batches)")] = _LIMITS.max_batch,
    max_connections: Annotated[int, typer.Option(help="Most open connections in all (503 above)")] = _LIMITS.max_connections,
    max_client_connections: Annotated[int | None, typer.Option(
        help="Most open connections per client IP (429 above; 0: no limit, e.g. behind a proxy); "
             "default: an eighth of --max-connections", show_default=False)] = _LIMITS.max_client_connections,
    header_timeout: Annotated[float, typer.Option(help="Seconds for a request's headers (connection closed after)")] = _LIMITS.header_timeout,
    body_timeout: Annotated[float, typer.Option(help="Seconds for a request's body after its headers (408 after)")] = _LIMITS.body_timeout,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Serve a model over HTTP: POST /predict (images → top-k JSON), GET /health, GET /.

    GET / is an upload page; POST /predict takes multipart images.

    transferlab serve runs/ants
    transferlab serve runs/ants/export/model.onnx --port 9000
    curl -F file=@photo.jpg http://127.0.0.1:8000/predict
    """
    from transferlab import api

    _setup_logging(verbose)
    api.serve(model, host=host, port=port, top_k=top_k, max_upload_mb=max_upload_mb, max_files=max_files,
              max_pixels=max_pixels, max_batch=max_batch, max_connections=max_connections,
              max_client_connections=max_client_connections, header_timeout=header_timeout,
              body_timeout=body_timeout)


_BENCH = _defaults(bench_infer_run)


@app.command("bench-infer", rich_help_panel=_MODEL_VERBS)
def bench_infer(
    run: Annotated[Path, typer.Argument(help="Run directory (or its model.safetensors)")],
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes")] = ",".join(map(str, _BENCH.batch_sizes)),
    runtimes: Annotated[str, typer.Option(help=f"Comma-separated: {','.join(RUNTIMES)}")] = ",".join(_BENCH.runtimes or RUNTIMES),
    seconds: Annotated[float, typer.Option(help="Timed seconds per runtime and batch size")] = _BENCH.seconds,
    min_runs: Annotated[int, typer.Option(help="At least this many timed calls per cell")] = _BENCH.min_runs,
    threads: Annotated[int | None, typer.Option(help="Threads for every runtime (default: physical cores)")] = _BENCH.threads,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Inference speed of a run's model on this machine: images/s, p50/p95 latency.

    Per batch size, for PyTorch eager, TorchScript and ONNX Runtime (both
    exported with a parity check first).

    transferlab bench-infer runs/ants
    transferlab bench-infer runs/ants --batch-sizes 1,8,64 \\
        --runtimes pytorch,onnxruntime --json
    """
    from transferlab import api

    _setup_logging(verbose)
    try:
        sizes = [int(b) for b in batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise TransferlabError(f"--batch-sizes takes integers like 1,32; got '{batch_sizes}'") from None
    result = api.bench_infer(run, batch_sizes=sizes, runtimes=[r.strip() for r in runtimes.split(",") if r.strip()],
                             seconds=seconds, min_runs=min_runs, threads=threads)
    if as_json:
        out_console.print_json(json.dumps(result))
        return
    env = result["environment"]
    load = env["load_average_before"]
    table = Table(title=f"inference: {env['model']} at {env['input_size']} px, {env['threads']} threads")
    caption = (f"model forward on preprocessed batches; {env['cpu']}; torch {env['torch']}, onnxruntime "
               f"{env['onnxruntime']}; load average before {load}, after {env['load_average_after']}")
    for col in ("runtime", "batch", "images/s", "p50 ms", "p95 ms", "CPU ms/image", "runs"):
        table.add_column(col, justify="left" if col == "runtime" else "right")
    for r in result["rows"]:
        table.add_row(r["runtime"], str(r["batch_size"]), f"{r['images_per_second']:.1f}", f"{r['p50_ms']:.2f}",
                      f"{r['p95_ms']:.2f}", f"{r['cpu_ms_per_image']:.2f}", str(r["runs"]))
    out_console.print(table)
    out_console.print(caption, highlight=False)


def main() -> None:
    """Entry point: user errors print a clear message and exit non-zero, never a traceback.
    Usage errors (unknown option, missing argument) are reported by Typer's standalone mode."""
    try:
        app()
    except TransferlabError as exc:
        from rich.markup import escape

        # the message may quote '[' (a YAML error, a path); piped, it stays one line instead of being broken
        # at the console's 160 columns (a terminal gets rich's word wrap)
        console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=not console.is_terminal)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/] — continue with `transferlab train --resume RUN_DIR`")
        sys.exit(130)


if __name__ == "__main__":
    main()
