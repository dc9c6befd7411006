"""The Python API — the CLI is a thin skin over these functions.

    import transferlab
    result = transferlab.train("data/", epochs_finetune=4, out="runs/ants")
    print(result.val_accuracy_best, result.run_dir)
    transferlab.predict(result.run_dir, ["img.jpg"], top_k=3)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transferlab.config import TrainConfig
from transferlab.errors import TransferlabError
from transferlab.evaluation.abstain import DEFAULT_TARGET_PRECISION, Abstainer, AbstainOptions
from transferlab.evaluation.doctor import DoctorOptions
from transferlab.export.limits import PREDICT_BATCH, TOP_K
from transferlab.logs import api_logging
from transferlab.workflows.compare import COMPARE_STRATEGIES

if TYPE_CHECKING:  # the heavy stack (torch, Lightning) loads only when a command needs it
    from transferlab.evaluation.doctor import DoctorResult
    from transferlab.evaluation.evaluate import EvalResult
    from transferlab.export.exporter import ExportResult
    from transferlab.recipes import Recipe
    from transferlab.training.lr_find import LRFindResult
    from transferlab.training.run import TrainResult
    from transferlab.workflows.compare import CompareResult
    from transferlab.workflows.recipe import RecipeResult
    from transferlab.workflows.select import SelectionResult

# The demo: the embedded default backbone on a real dataset that an installed package ships
# (scikit-learn's 1 797 handwritten digits, upsampled). Measured choices (see README):
# - 96 px keeps the whole job near one minute on 2 CPU cores;
# - digits are far from ImageNet, so the whole network fine-tunes at one rate (val acc after 3
#   epochs: 0.975 with lr_decay none, 0.967 with layer:0.8, 0.916 with exp:3);
# - no augmentation: flips and crops change what a digit is;
# - head lr 1e-2: at 1e-3 the 16 head epochs underfit the 1 280-d features (0.875 vs 0.911).
DEMO_OVERRIDES: dict[str, Any] = {
    "img_size": 96,
    "epochs_frozen": 16,
    "lr_head": 1e-2,
    "epochs_finetune": 3,
    "finetune": "full",
    "lr_finetune": 1e-3,
    "lr_decay": "none",
    "augment": "none",
}


def train(data: str | Path | None = None, *, resume: str | Path | None = None, allow_changed_data: bool = False,
          config: str | Path | None = None, verbose: bool = True, **options: Any) -> TrainResult:
    """Train a classifier on `data` (ImageFolder tree, class folders, or CSV). `options` are
    TrainConfig fields (backbone, head, epochs_frozen, lr_decay, ...); `config` a YAML file of them (a
    run's config.yaml works) used as defaults, `data` included, that `options` override; `resume`
    continues a run (refused when its data changed since it started, unless `allow_changed_data`), and with
    `epochs_finetune` above the fine-tuning epochs a finished run did, trains it longer (a new fine-tuning
    cycle: training.run._plan_extension); other options with `resume` are refused.
    Progress (phases, one line per epoch) goes to stderr as the CLI prints it unless logging is configured
    (logs.api_logging); `verbose=False` keeps warnings only."""
    with api_logging(verbose):
        return _train_api(data, resume, allow_changed_data, config, options)


def _train_api(data, resume, allow_changed_data: bool, config, options: dict[str, Any]) -> TrainResult:
    from transferlab.config import read_options
    from transferlab.training.run import train as _train

    if config is not None:
        defaults = read_options(config)
        data = data if data is not None else defaults.pop("data", None)
        defaults.pop("data", None)
        options = {**defaults, **options}

    if resume is not None:  # only what a resumed run can honour (an extension's epochs_finetune); the rest is refused
        return _train(TrainConfig(), resume=resume, allow_changed_data=allow_changed_data,
                      resume_options={**({"data": data} if data is not None else {}), **options})
    return _train(TrainConfig.from_options("train", data, options))


def lr_find(data: str | Path, *, num_steps: int = 100, method: str = "valley", start_lr: float = 1e-7,
            end_lr: float = 1.0, out: str | Path | None = None, **options: Any) -> LRFindResult:
    """LR range test of the stage `train` fine-tunes by default (the boundary top, from the head fitted on
    the frozen features as `train` fits it): `num_steps` steps from `start_lr` to `end_lr`, suggestion by
    `method` (valley | steep | minimum). Writes OUT/lr_find.png and OUT/lr_find.json (default
    runs/lr-find-<time>); `result.suggestion` is a value for `train(..., lr_finetune=...)`. `options` are
    the TrainConfig fields that shape the data and the model (backbone, img_size, eval_size, val_split,
    seed, batch_size, boundary_stages, ...)."""
    from transferlab.training.lr_find_run import check_options, find_lr

    check_options(num_steps, method, start_lr, end_lr)
    return find_lr(TrainConfig.from_options("lr_find", data, options), num_steps=num_steps, method=method,
                   start_lr=start_lr, end_lr=end_lr, out=out)


def shards(data: str | Path, out: str | Path, *, shard_size: int = 1000, val_split: float = TrainConfig.val_split,
           seed: int = TrainConfig.seed, progress: bool = True) -> dict:
    """Write `data` (any layout `train` reads) as WebDataset tar shards OUT/{train,val,test}/SPLIT-NNNNNN.tar,
    `shard_size` images each, with the same split `train` would use; returns the manifest (OUT/shards.json).
    `train(OUT)` then reads them in place."""
    from transferlab.data.shard_writer import write_shards

    return write_shards(data, out, shard_size=shard_size, val_split=val_split, seed=seed, progress=progress)


def predict(model: str | Path, inputs: Iterable[str | Path], *, top_k: int = TOP_K, batch_size: int = PREDICT_BATCH,
            on_entry: Callable[[dict], None] | None = None, unknown: str | float | None = None,
            target_precision: float = DEFAULT_TARGET_PRECISION, sets: float | None = None,
            explain: str | Path | None = None) -> list[dict]:
    """Top-k predictions for images, folders or globs: [{"path", "predictions": [{"label", "probability"}]}
    or {"path", "error"}] in input order; a multi-label model's entries add "labels" (every label at or
    above its threshold, most probable first) before "predictions". `model`: a run directory, its
    model.safetensors, or an exported .onnx (onnxruntime only: torch is never imported). `on_entry` sees
    each result as it is made.

    `unknown` ("auto" for the val threshold reaching `target_precision`, or a probability) adds "label"
    ("unknown" below the threshold) and "abstained"; `sets` (a coverage, e.g. 0.9) adds the conformal
    "set" of labels (evaluation/abstain.py). `explain`: a folder that gets one class-activation overlay
    PNG per image (a run only), named in each entry's "explanation"."""
    results = []
    _, entries, _ = _prediction_stream(model, inputs, top_k, batch_size, explain,
                                       AbstainOptions(unknown, target_precision, sets))
    for entry in entries:
        if on_entry is not None:
            on_entry(entry)
        results.append(entry)
    return results


def abstain_rule(model: str | Path, unknown: str | float | None = None,
                 target_precision: float = DEFAULT_TARGET_PRECISION, sets: float | None = None) -> Abstainer | None:
    """The threshold (with its val coverage and precision) and conformal quantile `predict` applies for
    these options, from the model's metadata alone; None when neither is asked for."""
    from transferlab.export.predictors import model_calibration

    options = AbstainOptions(unknown, target_precision, sets)
    return Abstainer.build(options, model_calibration(model), str(model)) if options.active else None


def predict_to_file(model: str | Path, inputs: Iterable[str | Path], out: str | Path, *, top_k: int = TOP_K,
                    batch_size: int = PREDICT_BATCH, on_entry: Callable[[dict], None] | None = None,
                    unknown: str | float | None = None, target_precision: float = DEFAULT_TARGET_PRECISION,
                    sets: float | None = None, explain: str | Path | None = None) -> dict[str, int]:
    """Like `predict`, streamed into `out` (.csv or .json) in constant memory; returns {"images", "failed"}."""
    from transferlab.export.batch import write_predictions

    predictor, results, abstainer = _prediction_stream(model, inputs, top_k, batch_size, explain,
                                                       AbstainOptions(unknown, target_precision, sets))
    decisions = [*(["labels"] if predictor.task == "multilabel" else []), *(abstainer.fields if abstainer else ())]
    return write_predictions(results, out, top_k=min(top_k, len(predictor.classes)), on_entry=on_entry,
                             decisions=decisions)


def _prediction_stream(model: str | Path, inputs: Iterable[str | Path], top_k: int, batch_size: int,
                       explain: str | Path | None, options: AbstainOptions):
    """(predictor, entries as they come, abstainer or None); the abstain options (checked when built),
    the overlay folder and the model's ability to be explained are checked before any image is scored."""
    from transferlab.export.batch import iter_predictions
    from transferlab.export.predictors import load_predictor

    overlays = None
    if explain is not None:
        from transferlab.evaluation.explain import explain_entries, overlay_folder
        from transferlab.export.predictors import model_kind

        if model_kind(model) == "onnx":
            raise TransferlabError(f"--explain needs the run directory: {model} is an ONNX model, and class-activation "
                                   "maps need the gradients of the PyTorch model.")
        overlays = overlay_folder(explain)
    predictor = load_predictor(model)
    if options.active and predictor.task == "multilabel":
        raise TransferlabError("--unknown and --sets apply to single-label models; a multi-label model already "
                               "answers with the labels above their thresholds (possibly none).")
    abstainer = Abstainer.build(options, predictor.calibration, str(model))
    results = iter_predictions(predictor, inputs, top_k=top_k, batch_size=batch_size, abstainer=abstainer)
    if overlays is not None:
        results = explain_entries(predictor.explainer(), results, overlays)
    return predictor, results, abstainer


def export_model(run: str | Path, format: str = "onnx", *, out: str | Path | None = None, dynamic_batch: bool = True,
           fp16: bool = False, opset: int | None = None, parity_images: int = 8) -> ExportResult:
    """Export a run to ONNX or TorchScript (default RUN/export/model.onnx) with a JSON sidecar (classes,
    preprocessing, parity). Raises if the file's probabilities differ from PyTorch's beyond tolerance."""
    from transferlab.export.exporter import export_run
    from transferlab.export.onnx import DEFAULT_OPSET

    return export_run(run, format, out=out, dynamic_batch=dynamic_batch, fp16=fp16,
                      opset=opset or DEFAULT_OPSET, parity_count=parity_images)


def serve(model: str | Path, *, host: str = "127.0.0.1", port: int = 8000, **limits: Any) -> None:
    """Serve `model` (run directory or .onnx) over HTTP until interrupted: POST /predict, GET /health, GET /
    (upload page). `limits`: the fields of export.limits.ServeLimits (max_upload_mb, max_files, max_pixels,
    max_batch, top_k, header_timeout, body_timeout, max_connections, max_client_connections), all checked
    before the model loads."""
    from transferlab.export.limits import ServeLimits
    from transferlab.export.serve import serve as _serve

    _serve(model, host=host, port=port, limits=ServeLimits(**limits))


def bench_infer(run: str | Path, **options: Any) -> dict:
    """Latency (p50/p95) and images/s of a run's model per runtime (PyTorch eager, TorchScript, ONNX Runtime)
    and batch size on this machine. Options: batch_sizes, runtimes, seconds, min_runs, threads, on_row."""
    from transferlab.export.bench_infer import bench_infer as _bench

    return _bench(run, **options)


def list_models(search: str | None = None, *, offline_only: bool = False, max_params: float | str | None = None,
                max_gflops: float | None = None) -> list[dict]:
    """Backbones (timm, torchvision, offline-shipped) with params, GFLOPs, input size, head, feature dim,
    ImageNet top-1 where published, and whether their weights work offline now. `max_params` takes
    "30M" or 5e6. See transferlab.models.catalog."""
    from transferlab.models.catalog import list_catalog

    return list_catalog(search, offline_only=offline_only, max_params=max_params, max_gflops=max_gflops)


def demo(out: str | Path | None = None, **overrides: Any) -> TrainResult:
    """The main job on the embedded default: EfficientNet-Lite0 (offline weights) on the digits."""
    from transferlab.data.digits import materialize_digits

    data = materialize_digits()
    options = {**DEMO_OVERRIDES, **overrides}
    return train(data, out=str(out) if out else None, **options)


def evaluate(
    run: str | Path,
    data: str | Path | None = None,
    *,
    split: str = "val",
    tta: bool = False,
    top_losses: int = 16,
    batch_size: int = 64,
    plots: bool = True,
    progress: bool = True,
    calibrate: bool | None = None,
) -> EvalResult:
    """Metrics and interpretation of a run on its own `split` (as in training) or on labelled `data`.
    Writes <run>/eval-<name>.json and, with `plots`, PNGs in <run>/eval-<name>/; returns an EvalResult.
    `calibrate` (val split only): True refits the temperature and the val scores in model.json (an
    existing run calibrated without retraining), False resets T to 1; None keeps what is stored."""
    from transferlab.classifier import evaluate_run_dir

    return evaluate_run_dir(run, data, plots=plots, split=split, tta=tta, top_losses=top_losses,
                            batch_size=batch_size, progress=progress, calibrate=calibrate)


def report(runs: str | Path | Iterable[str | Path], out: str | Path | None = None, *, progress: bool = True) -> Path:
    """One self-contained HTML page for one run or comparing several; evaluates runs not yet evaluated.
    Default output: <run>/report.html for one run, ./report.html for several."""
    from transferlab.reporting.html import write_report

    run_dirs = [runs] if isinstance(runs, (str, Path)) else list(runs)
    return write_report(run_dirs, out, progress=progress)


def doctor(data: str | Path, *, similarity: float = DoctorOptions.similarity, folds: int = DoctorOptions.folds,
           imbalance: float = DoctorOptions.imbalance, outlier_z: float = DoctorOptions.outlier_z,
           top: int = DoctorOptions.top, out: str | Path | None = None, progress: bool = True,
           **options: Any) -> DoctorResult:
    """What is wrong with a dataset: unreadable files, exact and near-duplicate images (cosine similarity of
    frozen features >= `similarity`; across splits they leak), label-issue candidates (confident learning on
    out-of-fold probe probabilities), class imbalance and image size/aspect outliers. From `train`'s cached
    features (the same backbone and settings) when it has them; else one forward pass, cached for `train`.
    `data`: a dataset (then `options` are TrainConfig fields: backbone, img_size, val_split, seed, ...,
    default out runs/doctor-<time>) or a run directory (its own data and settings, out RUN/doctor).
    Writes OUT/findings.csv and OUT/doctor.json; `result.findings` lists them, `result.of_kind(kind)` one kind."""
    from transferlab.evaluation.doctor import doctor_run, is_run_dir, run_doctor

    checks = DoctorOptions(similarity=similarity, folds=folds, imbalance=imbalance, outlier_z=outlier_z, top=top)
    checks.validate()
    if data is not None and is_run_dir(data):
        if options:
            raise TransferlabError(f"{data} is a run: its doctor uses the run's own settings, so "
                                   f"{', '.join(sorted(options))} cannot be set; pass its data folder to choose them")
        if out is not None:
            raise TransferlabError(f"{data} is a run: its doctor writes into {Path(data) / 'doctor'}; leave out --out")
        return doctor_run(data, checks, progress=progress)
    return run_doctor(TrainConfig.from_options("doctor", data, {**options, "progress": progress}), checks, out=out)


def select(data: str | Path, backbones: str | Iterable[str] | None = None, **options: Any) -> SelectionResult:
    """Rank candidate backbones on `data` by linear-probe accuracy on frozen features (one forward pass
    per image, shared with training's feature cache), with latency, memory and a Pareto front; recommend
    the best within `budget_ms`. Options: max_params, search, budget_ms, out, pretrained, img_size,
    val_split, seed, device, precision, batch_size, cache_dir, progress (see workflows.select.select)."""
    from transferlab.workflows.select import select as _select

    return _select(data, backbones, **options)


def compare(data: str | Path, backbones: str | Iterable[str], strategies: str | Iterable[str] = COMPARE_STRATEGIES,
            *, out: str | Path | None = None, **options: Any) -> CompareResult:
    """Train every backbone x strategy on `data` (run dirs DIR/<backbone>__<strategy>), then one table,
    plots and compare.html. Re-running with the same `out` skips finished cells and resumes unfinished
    ones. `options` are TrainConfig fields shared by every cell (epochs_frozen, img_size, pretrained...)."""
    from transferlab.workflows.compare import compare as _compare

    return _compare(data, backbones, strategies, out=out, **options)


def recipes() -> list[Recipe]:
    """The shipped recipes (the classic experiments as data): see transferlab.recipes."""
    from transferlab.recipes import list_recipes

    return list_recipes()


def recipe_show(name: str, overrides: Iterable[str] = ()) -> Recipe:
    """Recipe `name` (or a path to a recipe .yaml) with `key=value` overrides applied and checked."""
    from transferlab.recipes import resolve_recipe

    return resolve_recipe(name, overrides)


def recipe_run(name: str, *, data_root: str | Path | None = None, overrides: Iterable[str] = (),
               out: str | Path | None = None, device: str = "auto", progress: bool = True) -> RecipeResult:
    """Run recipe `name`: its dataset under `data_root` (default $TRANSFERLAB_HOME/datasets; downloaded
    through torchvision when missing and online), then train/compare with its settings. The run directory
    holds recipe.json, so `report` shows the run's numbers beside the published ones."""
    from transferlab.workflows.recipe import run_recipe

    return run_recipe(recipe_show(name, overrides), data_root=data_root, out=out, device=device, progress=progress)
