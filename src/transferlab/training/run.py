"""The two-stage schedule end to end: data → backbone → cached-feature head → fine-tuning → run dir.

Strategies:
  two-stage  feature extraction (head on cached frozen features), then fine-tuning (default)
  head-only  feature extraction only
  full       fine-tune everything from the start (new head at --lr-head, body at --lr-finetune)
  scratch    same network, random init, every parameter at --lr-head, BatchNorm trained

Every stage leaves the run directory consistent: metrics.csv, state.json and the best model are
rewritten atomically after each epoch, so `--resume RUN` continues from the last finished epoch.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from transferlab import _runtime
from transferlab.config import AUTO_LR, DEFAULT_LR_FINETUNE, TrainConfig, parse_duration, parse_size
from transferlab.data.datasets import DecodedImages, ImageDataset, label_targets
from transferlab.data.multilabel import resolve_task
from transferlab.data.sources import DataSplits, load_splits
from transferlab.data.transforms import eval_transform, eval_view, train_transform
from transferlab.errors import RunDirError, TransferlabError
from transferlab.export.limits import TOP_K
from transferlab.io import (
    atomic_write_json,
    ensure_writable_dir,
    load_tensors,
    save_tensors,
)
from transferlab.logs import progress_bar
from transferlab.models.fold_bn import folded_for_inference
from transferlab.models.heads import HeadConfig, build_classifier, head_slot
from transferlab.models.param_groups import discriminative_param_groups, freeze_backbone, unfreeze
from transferlab.models.registry import BackboneSpec, resolve_backbone
from transferlab.reporting.curves import plot_curves
from transferlab.run_dir import RunDir, RunState
from transferlab.training import boundary, distributed
from transferlab.training import budget as budget_mod
from transferlab.training import thresholds as thresholds_mod
from transferlab.training.checkpoint import load_training_state, save_training_state, set_rng_state
from transferlab.training.features import check_any_input_size, decoded_images, frozen_features, resolve_sizes
from transferlab.training.finetune import FineTuneModule, TrainingDiverged
from transferlab.training.gate import FrozenStageGate
from transferlab.training.head_stage import selection_score, train_head
from transferlab.training.progressive import ProgressiveResize, progressive_sizes
from transferlab.training.run_lock import RunLock
from transferlab.training.tracking import Tracker

if TYPE_CHECKING:
    from transferlab.classifier import Classifier

log = logging.getLogger("transferlab")

MODEL_FORMAT = "transferlab.model/1"
CYCLE_START = "cycle_start.safetensors"  # in checkpoints/: the model a boundary extension's cycle starts from


@dataclass
class TrainResult:
    """What `train` returns: where the run went and its headline numbers."""

    run_dir: Path
    summary: dict[str, Any]
    rows: list[dict] = field(default_factory=list)
    is_global_zero: bool = True  # False in the other processes of a multi-device run
    _classifier: Classifier | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def val_accuracy_best(self) -> float:
        return self.summary["val_accuracy_best"]

    @property
    def val_accuracy_final(self) -> float:
        return self.summary["val_accuracy_final"]

    @property
    def classes(self) -> list[str]:
        return self.summary["classes"]

    @property
    def classifier(self) -> Classifier:
        """The trained model as an object (transferlab.load of the run), loaded once on first use."""
        if self._classifier is None:
            from transferlab.classifier import load

            self._classifier = load(self.run_dir)
        return self._classifier

    def predict(self, inputs, top_k: int = TOP_K) -> list[dict]:
        """transferlab.predict's dicts for `inputs` (files, folders, globs); `classifier.predict` gives
        typed Predictions and takes in-memory images too."""
        return [p.to_dict() for p in self.classifier.predict(list(inputs) if not isinstance(inputs, (str, Path))
                                                              else [inputs], top_k=top_k)]


def _planned(state: RunState, cfg: TrainConfig) -> int:
    """The fine-tuning epochs this run runs to: as planned (a --time-budget or an extension), else as asked."""
    return cfg.epochs_finetune if state.finetune_epochs_planned is None else state.finetune_epochs_planned


def _setup_file_log(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(RunDir(run_dir).log_path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    if log.level == logging.NOTSET or log.level > logging.INFO:
        log.setLevel(logging.INFO)
    return handler


def model_metadata(spec: BackboneSpec, head: HeadConfig, classes: list[str], extra: dict) -> dict:
    return {
        "format": MODEL_FORMAT,
        "classes": classes,
        "num_classes": len(classes),
        "backbone": spec.to_dict(),
        "head": head.to_dict(),
        "preprocessing": spec.preprocessing.to_dict(),
        **extra,
    }


def save_model(run_dir: Path, model: torch.nn.Module | dict[str, torch.Tensor], meta: dict) -> None:
    """The best model (a module or its state dict): model.safetensors first, then model.json (the
    commit point, read first)."""
    weights = model.state_dict() if isinstance(model, torch.nn.Module) else model
    rd = RunDir(run_dir)
    save_tensors(rd.weights_path, weights, metadata={"format": MODEL_FORMAT})
    atomic_write_json(rd.model_meta_path, meta)


RESUME_OPTIONS = ("epochs_finetune", "progress", "report", "loggers", "num_workers")
"""What may be given with --resume: a larger epochs_finetune extends a finished run; the others do not
change the model. Any other option would make the resumed run differ from the one its config.yaml
describes, so it is refused."""


def check_resume_options(run_dir: str | Path, options: dict[str, Any]) -> None:
    """Refuse, before any work, options given with --resume that it cannot honour."""
    def flag(name: str) -> str:  # as the command line spells it (the loggers field is --logger)
        return "DATA" if name == "data" else "--" + {"loggers": "logger"}.get(name, name).replace("_", "-")

    refused = [k for k in options if k not in RESUME_OPTIONS]
    if refused:
        others = ", ".join(flag(k) for k in RESUME_OPTIONS if k != "epochs_finetune")
        raise TransferlabError(
            f"--resume {run_dir} trains with the settings in its config.yaml; {', '.join(map(flag, refused))} "
            f"cannot be changed on a resumed run (only --epochs-finetune, to train a finished run longer, and "
            f"{others}). Start a new run with another --out to use other settings.")


def train(cfg: TrainConfig, *, resume: str | Path | None = None, allow_changed_data: bool = False,
          resume_options: dict[str, Any] | None = None) -> TrainResult:
    """Run (or resume) one training run; returns its result. Raises TransferlabError on bad input.
    `allow_changed_data`: resume even though the data's fingerprint differs from the run's.
    `resume_options` (RESUME_OPTIONS only): what a resumed run changes; `epochs_finetune` larger than the
    fine-tuning epochs a finished run did extends it (see `_plan_extension`)."""
    _runtime.setup_torch()
    extend_to = None
    if resume is not None:
        rd = RunDir(resume)
        resume_options = dict(resume_options or {})
        check_resume_options(rd.path, resume_options)
        if not rd.is_run:
            raise RunDirError(f"Cannot resume: '{rd.path}' is not a run directory (no config.yaml).")
        cfg = rd.config()
        asked = resume_options.pop("epochs_finetune", None)
        extend_to = _plan_extension(rd, cfg, asked)
        if extend_to is None and rd.status == "finished":  # nothing left to do: no data pass, no report
            return _finished_result(rd, asked)
        for k, v in resume_options.items():
            setattr(cfg, k, v)
        if cfg.task == "auto":  # new runs save the task they resolved to: this run predates tasks
            cfg.task = "single"
    elif cfg.data:
        # config.yaml keeps the data where it is, not where it was seen from: --resume works from any directory
        cfg.data = os.path.abspath(os.path.expanduser(cfg.data))
    cfg.validate()
    if cfg.data:  # the task decides the head and the loss: resolved from the CSV's cells before any work
        cfg.task, cfg.label_sep = resolve_task(cfg.task, cfg.data, cfg.label_sep)
        cfg.validate()
    start = time.perf_counter()

    pretrained = cfg.pretrained and cfg.strategy != "scratch"
    # Resolve the backbone before touching the data: offline, a missing download fails at once.
    spec = resolve_backbone(cfg.backbone, pretrained=pretrained, img_size=cfg.img_size)
    if cfg.preprocess:  # e.g. a dataset's own mean/std (recipes): travels with the model into model.json
        spec = dataclasses.replace(spec, preprocessing=dataclasses.replace(spec.preprocessing, **cfg.preprocess))
    accelerator = _runtime.resolve_accelerator(cfg.device)
    if cfg.dist_strategy == "fsdp" and accelerator != "cuda":
        raise TransferlabError(f"--dist-strategy fsdp needs CUDA GPUs (Lightning's FSDP); this run is on "
                               f"{accelerator}. Use --dist-strategy ddp.")
    # Lightning's start-up chatter (GPU/TPU availability, tips, process-group banners) says nothing
    # a user of ours needs.
    quiet = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.WARNING)
    level = log.level
    # From here on, with --devices/--num-nodes > 1, this code runs once per process (rank).
    ranks = distributed.launch(cfg.devices, cfg.num_nodes, accelerator)

    locks: list[RunLock] = []
    # what was in the output directory before this call (None: the call creates it): a run that fails
    # before its first epoch removes what it added, since a half-written directory only poses as a run
    before: list[set[str] | None] = []

    def open_run_dir() -> Path:
        path = Path(resume) if resume is not None else Path(cfg.out or RunDir.default(cfg.backbone).path)
        if resume is None:
            before.append(set(os.listdir(path)) if path.is_dir() else None)
        ensure_writable_dir(path)
        locks.append(RunLock(path).acquire())  # a second `train` into the same directory stops here
        return path

    run_dir = ranks.on_zero(open_run_dir)
    handler = _setup_file_log(run_dir) if ranks.is_zero else None
    failed = True
    try:
        with Tracker(cfg.loggers if ranks.is_zero else [], run_dir, cfg) as tracker:
            result = TrainingFlow(run_dir, cfg, spec, start, resuming=resume is not None, ranks=ranks,
                                  allow_changed_data=allow_changed_data, tracker=tracker, extend_to=extend_to).run()
        failed = False
        return result
    except KeyboardInterrupt:
        failed = False  # an interrupted run is kept: `--resume` continues it
        raise
    finally:
        for lock in locks:
            lock.release()
        for q, lvl in zip(quiet, levels):
            q.setLevel(lvl)
        log.setLevel(level)
        if handler is not None:
            log.removeHandler(handler)
            handler.close()
        if failed and before and not RunState.load(run_dir).rows:
            _remove_added(run_dir, before[0])


def _remove_added(run_dir: Path, kept: set[str] | None) -> None:
    """Remove `run_dir` (kept is None: this run created it) or the entries not in `kept`."""
    if kept is None:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for name in set(os.listdir(run_dir)) - kept:
        path = run_dir / name
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _finished_result(rd: RunDir, asked: int | None = None) -> TrainResult:
    """A finished run's saved result: it is not trained, evaluated or reported again. `asked`: the
    --epochs-finetune given, not above the epochs the run did."""
    state, summary = rd.state(), rd.summary()
    best, done = summary["best"], state.finetune_epochs_done
    why = "" if asked is None else f" (--epochs-finetune {asked} is not above the {done} it did)"
    log.info("%s is a finished run (best val accuracy %.4f, %s epoch %d; %d fine-tuning epoch(s)): nothing to "
             "resume%s. To train longer, resume it with --epochs-finetune above %d.", rd.path, best["val_accuracy"],
             best["phase"], best["epoch"], done, why, done)
    return TrainResult(run_dir=rd.path, summary=summary, rows=state.rows or rd.metrics())


def _plan_extension(rd: RunDir, cfg: TrainConfig, epochs: int | None) -> int | None:
    """The fine-tuning epochs a resumed run is extended to, or None when it only resumes (or is finished).

    Extending (fastai's "fit_one_cycle again after fine_tune"): a finished run that did D fine-tuning
    epochs, resumed with --epochs-finetune N > D, runs a new fine-tuning cycle of N - D epochs from its best
    model — a fresh optimizer and its own one-cycle schedule over those epochs, the run's fine-tuning mode
    and learning rates, no --time-budget (it was the first cycle's), its rows appended to metrics.csv as
    epochs D+1..N, the best model replaced only by an epoch that beats it on val. Calibration, evaluation,
    summary and report are then redone, and config.yaml records epochs_finetune N. The state is marked
    running before the first new epoch, so an interrupted extension is an interrupted run: --resume
    continues it. A head-only run, or one whose fine-tuning was skipped by a rule, is refused: training it
    further would be a different strategy from the one its config.yaml records — a new run says so."""
    if epochs is None:
        return None
    state = rd.state()
    done = state.finetune_epochs_done
    if rd.status != "finished":
        # an extension under way counts as asked for (so do the other processes of a multi-device one,
        # which read the state after rank 0 has started it)
        if epochs not in (cfg.epochs_finetune, *(e["to_epochs"] for e in state.extensions[-1:])):
            raise RunDirError(f"{rd.path} is an interrupted run of {cfg.epochs_finetune} fine-tuning epoch(s): "
                              f"finish it first (`transferlab train --resume {rd.path}`), then extend it with "
                              f"--epochs-finetune.")
        return None
    if epochs <= done:
        return None
    if cfg.strategy == "head-only":
        raise RunDirError(f"{rd.path} is a head-only run: it has no fine-tuning stage to extend. Start a new run "
                          f"with --strategy two-stage (another --out) to fine-tune.")
    skipped = (state.finetune or {}).get("skipped")
    if skipped:
        raise RunDirError(f"{rd.path} skipped fine-tuning ({skipped}): extending it would overrule that decision. "
                          f"Start a new run (another --out) with --finetune-when always to fine-tune.")
    return epochs


def _open_state(rd: RunDir, resuming: bool, extend_to: int | None = None) -> RunState:
    state = rd.state()
    if not resuming and state.rows:
        raise RunDirError(
            f"Output directory '{rd.path}' already holds a run. Use --resume {rd.path} to continue it, "
            "or choose another --out."
        )
    if extend_to is not None:  # committed before any epoch: from here on the run reads as interrupted
        done = state.finetune_epochs_done
        log.info("extending %s: a new fine-tuning cycle of %d epoch(s) (epochs %d-%d) from its best model",
                 rd.path, extend_to - done, done + 1, extend_to)
        state.extensions.append({"from_epochs": done, "to_epochs": extend_to, "best_before": state.best,
                                 "started_at": datetime.now(UTC).isoformat(timespec="seconds")})
        if (state.finetune or {}).get("mode") == "boundary":
            # an interrupted boundary stage is redone whole, so its cycle must find where it started
            rd.checkpoints.mkdir(exist_ok=True)
            shutil.copyfile(rd.weights_path, rd.checkpoints / CYCLE_START)
        state.status = "running"
        state.finetune_cycle_start = done
        state.finetune_epochs_planned = extend_to
        state.finetune_stopped_early = False
        state.boundary_done = False
        state.thresholds = None  # tuned again for the model the extension ends with
        state.save()
    return state


class TrainingFlow:
    """One invocation of a run, stage by stage: data, frozen features and head, fine-tuning, final outputs.

    What every stage shares lives here once — the run directory, the config, the backbone spec, the data
    splits, the run state, the model, the tracker and the process ranks — instead of being threaded
    through closures and positional parameters; each stage is a method that reads and updates it."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, spec: BackboneSpec, start: float, *, resuming: bool,
                 ranks: distributed.Ranks, tracker: Tracker, allow_changed_data: bool = False,
                 extend_to: int | None = None) -> None:
        self.rd, self.run_dir = RunDir(run_dir), Path(run_dir)
        self.cfg, self.spec, self.start = cfg, spec, start
        self.resuming, self.allow_changed_data, self.extend_to = resuming, allow_changed_data, extend_to
        self.ranks, self.tracker = ranks, tracker
        self.accelerator = _runtime.resolve_accelerator(cfg.device)
        self.precision = _runtime.resolve_precision(cfg.precision, self.accelerator, training=True)
        self.extract_precision = _runtime.resolve_precision(cfg.precision, self.accelerator, training=False)
        self.autocast = _runtime.autocast_dtype(self.extract_precision)
        # set by run(): the state first (rank 0 reads and checks it; every rank starts from the same one)
        self.state: RunState
        self.splits: DataSplits
        self.model: torch.nn.Module
        self.head_cfg = HeadConfig(kind=cfg.head, hidden=cfg.head_hidden, dropout=cfg.head_dropout)
        self.train_pre = spec.preprocessing  # at img_size (training crops); spec.preprocessing is at eval_size
        self.decoded: DecodedImages | None = None
        self.elapsed_before = 0.0
        self.tapped: dict[str, torch.Tensor] = {}  # boundary activations of the feature pass (memory only: a resumed run recomputes)
        self.val_features: torch.Tensor | None = None  # the frozen val features of this invocation's feature pass

    # ---- what every stage uses
    def elapsed(self) -> float:
        """Seconds over every invocation of the run."""
        return self.elapsed_before + time.perf_counter() - self.start

    def record(self, phase: str, rec: dict) -> None:
        """One epoch's metrics row: into the state, the log and the trackers (metrics.csv is rewritten by the stage)."""
        row = {"phase": phase, **rec, "elapsed_seconds": self.elapsed()}
        self.state.rows.append(row)
        self.state.elapsed_seconds = row["elapsed_seconds"]
        _print_epoch(row)
        self.tracker.log_rows(self.state.rows)  # --logger: the same rows to Lightning's loggers

    def maybe_save_best(self, phase: str, epoch: int, val_acc: float, val_loss: float, weights=None) -> None:
        """Save the model (or `weights`) as the run's best when this epoch beats the best so far on val."""
        state, best = self.state, self.state.best
        score = selection_score(val_acc, val_loss)
        if best is None or score > selection_score(best["val_accuracy"], best["val_loss"]):
            # stored JSON-safe: a NaN accuracy as -1, a non-finite loss as 1e9
            state.best = {"phase": phase, "epoch": epoch, "val_accuracy": score[0],
                          "val_loss": val_loss if math.isfinite(val_loss) else 1e9}
            save_model(self.run_dir, self.model if weights is None else weights,
                       model_metadata(self.spec, self.head_cfg, self.splits.classes,
                                      {"best": state.best, **_task_meta(self.splits)}))

    # ---- the stages
    def run(self) -> TrainResult:
        cfg, ranks, rd = self.cfg, self.ranks, self.rd
        state = self.state = ranks.on_zero(lambda: _open_state(rd, self.resuming, self.extend_to))
        if state.extensions:  # the epochs the run trains to, as rank 0's state says on every rank
            cfg.epochs_finetune = state.extensions[-1]["to_epochs"]
        self.elapsed_before = state.elapsed_seconds
        spec = self.spec
        log.info("run directory: %s", self.run_dir)
        log.info("backbone %s (%s) on %s: features in %s, training in %s",
                 spec.name, spec.source, self.accelerator, self.extract_precision, self.precision)
        if ranks.world_size > 1:
            log.info("distributed: %d processes (%d device(s) x %d node(s)), fine-tuning strategy %s",
                     ranks.world_size, cfg.devices, cfg.num_nodes, cfg.dist_strategy)

        # ---- data
        t0 = time.perf_counter()
        self.spec, self.train_pre = resolve_sizes(cfg, spec)
        if cfg.num_workers is None:
            cfg.num_workers = _runtime.default_num_workers()
        splits = self.splits = ranks.on_zero(self._read_data)
        log.info("data: %d train / %d val images, %d classes, %d skipped (%.1fs)",
                 len(splits.train), len(splits.val), len(splits.classes), len(splits.skipped), time.perf_counter() - t0)
        state.add_seconds("data", time.perf_counter() - t0)

        L.seed_everything(cfg.seed, workers=True, verbose=False)
        self.model = build_classifier(self.spec, len(splits.classes), self.head_cfg)
        if cfg.eval_size != cfg.img_size:
            check_any_input_size(self.model, cfg)
        self.decoded = decoded_images(cfg)
        self.splits = ranks.on_zero(self._drop_vanished)  # every rank extracts from the same samples

        if cfg.strategy in ("two-stage", "head-only") and cfg.epochs_frozen > 0:
            self._frozen_stage()
        if (cfg.strategy in ("two-stage", "full", "scratch") and cfg.epochs_finetune > 0
                and state.finetune_epochs_planned is None):
            state.finetune_epochs_planned = ranks.broadcast(
                _plan_finetune(cfg, self.splits, state, self.elapsed(), self.extract_precision, self.precision))
        if cfg.strategy in ("two-stage", "full", "scratch") and (state.finetune_epochs_planned or 0) > 0:
            # an extension runs the epochs it was asked for: the budget was the first cycle's
            deadline = (None if cfg.time_budget is None or state.extensions
                        else time.perf_counter() + parse_duration(cfg.time_budget) - self.elapsed())
            if not self._boundary_finetune(deadline):
                self._finetune(deadline)
        if self.splits.multilabel and ranks.is_zero and state.thresholds is None:
            _tune_thresholds(self.model, self.run_dir, self.splits, self.spec, cfg, state, self.decoded,
                             self.val_features)

        # ---- final outputs (rank 0 writes them; every rank returns the same result)
        # wall-clock start of this invocation: lets an outside timer split its own figure into process
        # start-up (imports), training and what follows (the report)
        started_at = datetime.fromtimestamp(time.time() - (time.perf_counter() - self.start), UTC)
        summary, rows = ranks.on_zero(lambda: _finish(self.run_dir, cfg, self.spec, self.splits, state, self.elapsed(),
                                                       self.extract_precision, self.precision, self.accelerator,
                                                       started_at, self.decoded))
        self.tracker.finish(rows, summary)
        return TrainResult(run_dir=self.run_dir, summary=summary, rows=rows, is_global_zero=ranks.is_zero)

    def _read_data(self) -> DataSplits:
        """The data, read and validated once, on rank 0 (validating every image is a full decode pass);
        config.yaml and data.json written, or a resumed run's data checked against its data.json."""
        cfg, rd = self.cfg, self.rd
        splits = load_splits(cfg.data, val_split=cfg.val_split, seed=cfg.seed, progress=cfg.progress,
                             csv_anywhere=cfg.csv_anywhere, task=cfg.task, label_sep=cfg.label_sep)
        for w in splits.warnings:
            log.warning(w)
        for s in splits.skipped:
            log.warning("skipped %s: %s", s["path"], s["reason"])
        if not self.resuming:
            cfg.save(rd.config_path)
        elif self.extend_to is not None:  # the saved settings, with the epochs the run now trains to
            saved = rd.config()
            saved.epochs_finetune = self.extend_to
            saved.save(rd.config_path)
        if self.resuming and not self.allow_changed_data and rd.data_path.exists():
            splits.check_unchanged(rd.data_summary())
        atomic_write_json(rd.data_path, splits.to_summary())
        return splits

    def _drop_vanished(self) -> DataSplits:
        """A file gone since validation is a skipped file, not a failed run."""
        if self.splits.drop_unreadable():  # each one logged as it is dropped
            atomic_write_json(self.rd.data_path, self.splits.to_summary())
        return self.splits

    def _frozen_stage(self) -> None:
        """Stage 1: the frozen backbone's features (every rank extracts its shard), then the head on them."""
        cfg, ranks, state, model, splits = self.cfg, self.ranks, self.state, self.model, self.splits
        stage1 = self.rd.checkpoints / "stage1.safetensors"
        if state.frozen_done:
            model.load_state_dict(load_tensors(stage1))
            return
        t1 = time.perf_counter()
        freeze_backbone(model)
        # rank 0 alone holds the assembled features
        features, n_extracted = frozen_features(model, splits, cfg, self.spec, self.train_pre, ranks, self.autocast,
                                                self.decoded, tap=_boundary_tap(model, cfg, splits, ranks),
                                                tapped=self.tapped)
        self.val_features = None if features is None else features[2]
        extract_seconds = time.perf_counter() - t1
        if n_extracted:  # the measured frozen-forward throughput plans a --time-budget
            state.forward_images_per_second = n_extracted / max(extract_seconds, 1e-9)

        def head_stage() -> dict[str, torch.Tensor]:  # once, on rank 0, on the cached tensors
            t2 = time.perf_counter()
            records, best_state = _fit_head(model, features, cfg, on_epoch=lambda rec: self.record("frozen", rec))
            best_rec = max(records, key=lambda r: selection_score(r["val_accuracy"], r["val_loss"]))
            state.frozen_val_loss = best_rec["val_loss"]  # what fine-tuning has to beat
            self.maybe_save_best("frozen", best_rec["epoch"], best_rec["val_accuracy"], best_rec["val_loss"])
            save_tensors(stage1, model.state_dict())
            state.phase_seconds["feature_extraction"] = extract_seconds
            state.phase_seconds["head_training"] = time.perf_counter() - t2
            state.frozen_done = True
            state.save()
            self.rd.write_metrics(state.rows)
            return best_state

        best_head = ranks.on_zero(head_stage)
        frozen_val_loss = ranks.broadcast(state.frozen_val_loss)
        if not ranks.is_zero:
            head_slot(model).head.load_state_dict(best_head)
            state.frozen_done = True
            state.frozen_val_loss = frozen_val_loss

    def _boundary_finetune(self, deadline: float | None) -> bool:
        """Two-stage fine-tuning of the top stages on a boundary cache (training/boundary.py). False when this
        run fine-tunes with the full loop instead: --finetune full, several processes, an architecture with no
        chain to cut, activations that do not fit in memory, or full-loop epochs already done (a resumed run)."""
        model, splits, cfg, spec, state = self.model, self.splits, self.cfg, self.spec, self.state
        ranks, decoded, autocast, tapped = self.ranks, self.decoded, self.autocast, self.tapped
        record, maybe_save_best = self.record, self.maybe_save_best
        if cfg.strategy != "two-stage" or cfg.finetune != "boundary" or not state.frozen_done:
            return False
        if state.boundary_done:
            return True
        cycle = state.finetune_cycle_start  # > 0: extending a run whose boundary stage ran
        extending = cycle > 0 and (state.finetune or {}).get("mode") == "boundary"
        if ranks.world_size > 1 or (state.finetune_epochs_done > 0 and not extending):
            return False
        plan = _boundary_plan(model, cfg, splits, ranks)
        if plan is None:
            if boundary.split_model(model, cfg.boundary_stages) is None:
                log.info("fine-tuning: no boundary split for %s; the whole network fine-tunes (--finetune full)", spec.name)
            else:
                log.info("fine-tuning: %d train images' boundary activations exceed the %.0f GiB cache; the whole "
                         "network fine-tunes", len(splits.train), boundary.CACHE_BUDGET_BYTES / 2**30)
            return False
        split, per_image, views = plan
        if views < cfg.boundary_views:
            log.info("fine-tuning: %d of %d augmented boundary view(s) fit in the %.0f GiB cache", views,
                     cfg.boundary_views, boundary.CACHE_BUDGET_BYTES / 2**30)
        head = max((r for r in state.rows if r["phase"] == "frozen"),
                   key=lambda r: selection_score(r["val_accuracy"], r["val_loss"]))
        fit = {"head_train_error": round(1 - head["train_accuracy"], 4), "head_val_error": round(1 - head["val_accuracy"], 4)}
        # The underfit rule was measured on single-label accuracy; on scene15 pairs it read the head's mAP
        # (train 0.893, val 0.763) as variance and skipped a stage that took val mAP to 0.916 (bench/RESULTS.md)
        if (cfg.finetune_when == "underfit" and not splits.multilabel and not extending
                and not boundary.head_underfits(head["train_accuracy"], head["val_accuracy"])):
            log.info("fine-tuning skipped: the head's train error (%.1f%%) is under %.0f%% of its val error (%.1f%%) — "
                     "it errs from variance, which adapting the features does not cure (--finetune-when always runs it)",
                     100 * fit["head_train_error"], 100 * boundary.UNDERFIT_RATIO, 100 * fit["head_val_error"])
            state.finetune = {"mode": "boundary", "skipped": "head not underfitting", **fit,
                                      "epochs_run": 0, "seconds": 0.0, "discarded_seconds": 0.0}
            state.boundary_done = True
            state.save()
            return True
        # An interrupted stage is redone whole (its epochs read views drawn once, and it takes minutes), from
        # the frozen stage's model (an extension's: the best model), which is the best again until an epoch beats it.
        state.rows = [r for r in state.rows if r["phase"] != "finetune" or r["epoch"] <= cycle]
        # The stage commits state.json at its end only, so an interrupted attempt may have left its best epoch
        # in model.json/model.safetensors alone: the starting model is saved as the best again then too.
        saved_best = self.rd.model_meta().get("best")
        if extending:
            model.load_state_dict(load_tensors(self.rd.checkpoints / CYCLE_START))
            before = state.extensions[-1]["best_before"]
            if state.best != before or saved_best != before:
                state.best = None
                maybe_save_best(before["phase"], before["epoch"], before["val_accuracy"], before["val_loss"])
        elif state.best["phase"] == "finetune" or saved_best != state.best:
            frozen = max((r for r in state.rows if r["phase"] == "frozen"),
                         key=lambda r: selection_score(r["val_accuracy"], r["val_loss"]))
            state.best = None
            maybe_save_best("frozen", frozen["epoch"], frozen["val_accuracy"], frozen["val_loss"])
        t0 = time.perf_counter()
        view_x, val_x, from_pass = _cache_boundary(split, splits, cfg, spec, views, decoded, autocast, tapped)
        caching = time.perf_counter() - t0
        log.info("fine-tuning the last %d stage(s) on the plain and %d augmented cached view(s) of %d train images "
                 "(%.1fs, %.0f MiB%s)", cfg.boundary_stages, views, len(splits.train), caching,
                 (len(splits.val) + (views + 1) * len(splits.train)) * per_image / 2**20,
                 "; plain and val from the feature pass" if from_pass else "")
        train_y = label_targets(splits.train, len(splits.classes), splits.multilabel)
        if extending:  # the first cycle's LR, found by its range test when it ran one
            lr_record = {k: v for k, v in state.finetune.items() if k.startswith("lr")}
            lr = lr_record["lr"]
        else:
            lr, lr_record = _boundary_lr(split.top, view_x, train_y, cfg)
        best = state.best
        epochs = _planned(state, cfg) - cycle
        if deadline is not None:
            epochs = _plan_boundary_epochs(split.top, val_x, len(train_y), epochs, deadline, autocast, state)

        if epochs == 0:
            state.phase_seconds["boundary_cache"] = caching
            state.finetune = {"mode": "boundary", "skipped": "time budget", **fit, "epochs_run": 0,
                                      "seconds": round(time.perf_counter() - t0, 3),
                                      "discarded_seconds": round(time.perf_counter() - t0, 3)}
            state.boundary_done = True
            state.save()
            return True

        def on_epoch(rec: dict, improved: bool) -> None:
            rec = {**rec, "epoch": cycle + rec["epoch"]}
            record("finetune", rec)
            if improved:
                maybe_save_best("finetune", rec["epoch"], rec["val_accuracy"], rec["val_loss"])
            self.rd.write_metrics(state.rows)

        records, best_top, stopped = boundary.train_top(
            split.top, view_x, train_y, val_x, label_targets(splits.val, len(splits.classes), splits.multilabel),
            epochs=epochs, lr=lr, head_lr=lr * HEAD_LR_MULTIPLIER, weight_decay=cfg.weight_decay,
            # an extension's cycle draws its own epochs' order, not a replay of the first cycle's
            label_smoothing=cfg.label_smoothing, batch_size=cfg.batch_size, seed=cfg.seed + cycle,
            # no gate: near the one-cycle peak the first epochs dipped below the head on potato_leaf and
            # scene15 before the last ones ended above it (bench/RESULTS.md); the head is kept unless beaten
            baseline=selection_score(best["val_accuracy"], best["val_loss"]), gate_epochs=0,
            patience=cfg.finetune_patience, autocast=autocast, deadline=deadline, on_epoch=on_epoch)
        split.top.to(memory_format=torch.contiguous_format)
        if best_top is not None:
            split.top.load_state_dict(best_top)
        else:
            rd = self.rd
            model.load_state_dict(load_tensors(rd.weights_path if extending else rd.checkpoints / "stage1.safetensors"))
        seconds = time.perf_counter() - t0
        best_epoch = state.best["epoch"] if state.best["phase"] == "finetune" else 0
        discarded = seconds if best_top is None else sum(r["epoch_seconds"] for r in records[best_epoch - cycle:])
        if stopped == "gate":
            log.info("fine-tuning did not beat the frozen stage in %d epoch(s): stopping; the frozen stage's model is "
                     "kept (--finetune-gate 0 runs every epoch)", cfg.finetune_gate)
        elif stopped == "early stop":
            log.info("early stop: fine-tuning epoch %d was the best; %d epoch(s) after it neither beat it nor lowered "
                     "the val loss: stopping at epoch %d of %d (--early-stop 0 runs every epoch)", best_epoch,
                     cfg.finetune_patience, len(records), epochs)
        elif stopped == "time budget":
            log.info("time budget: fine-tuning stopped after epoch %d", len(records))
        state.add_seconds("boundary_cache", caching)
        state.add_seconds("finetune", seconds - caching)
        earlier = state.finetune if extending else {}  # an extension's record covers every cycle
        state.finetune = {"mode": "boundary", "stages": cfg.boundary_stages, "views": views, **fit,
                          "from_feature_pass": from_pass, **lr_record,
                          "epochs_run": cycle + len(records), "stopped": stopped, "best_epoch": best_epoch,
                          "seconds": round(earlier.get("seconds", 0.0) + seconds, 3),
                          "discarded_seconds": round(earlier.get("discarded_seconds", 0.0) + discarded, 3)}
        state.finetune_epochs_done = cycle + len(records)
        state.boundary_done = True
        state.save()
        self.rd.write_metrics(state.rows)
        return True

    def _finetune(self, deadline: float | None) -> None:
        """Fine-tuning with the full loop (Lightning): every unfrozen block, the data through the whole
        network each epoch, a resumable checkpoint after each."""
        from lightning.pytorch.callbacks import EarlyStopping

        # spec.preprocessing is at eval_size (validation), pre at img_size (training crops)
        model, splits, cfg, spec, pre, state = self.model, self.splits, self.cfg, self.spec, self.train_pre, self.state
        run_dir, accelerator, precision, ranks, decoded = self.run_dir, self.accelerator, self.precision, self.ranks, self.decoded
        checkpoints = self.rd.checkpoints
        last = checkpoints / "last"
        done = state.finetune_epochs_done
        cycle = state.finetune_cycle_start  # > 0: an extension's cycle, from the best model
        gate = None
        baseline = state.frozen_val_loss
        # the gate weighs fine-tuning against the frozen stage: an extension starts from a fine-tuned model
        if cfg.finetune_gate > 0 and cfg.strategy == "two-stage" and baseline is not None and cycle == 0:
            earlier = ranks.broadcast([r["val_loss"] for r in state.rows if r["phase"] == "finetune"][:done])
            gate = FrozenStageGate(baseline, cfg.finetune_gate, losses=earlier)
            if gate.closed() and not state.finetune_stopped_early:
                # killed after the gate's epoch was saved but before its stop was: decide as the first run did
                log.info("fine-tuning did not beat the frozen stage in %d epoch(s): not resuming it", cfg.finetune_gate)
                state.finetune_stopped_early = True
                if ranks.is_zero:
                    state.save()
                return
        restore: dict[str, Any] = {}
        early_state = rng_to_restore = None
        if done > cycle:
            if cfg.dist_strategy == "fsdp":
                # the saved optimizer state is the full (unsharded) one; FSDP would need it re-sharded
                raise RunDirError(f"Resuming FSDP fine-tuning mid-way is not supported; {run_dir} finished "
                                  f"{done} fine-tuning epoch(s) and its best model is saved in model.safetensors.")
            model_state, trees, info, rng_to_restore = load_training_state(last)
            if info.get("epoch", done) > done and "run_state" in info:  # killed before state.json caught up
                state.update(info["run_state"])
                done = state.finetune_epochs_done
                if ranks.is_zero:
                    state.save()
            model.load_state_dict(model_state)
            restore = {"optimizer": trees["optimizer"], "scheduler": trees["scheduler"]}
            early_state = trees.get("early_stopping")
            log.info("resuming fine-tuning after epoch %d", done)
        elif cycle > 0:
            model.load_state_dict(load_tensors(self.rd.weights_path))
        epochs = _planned(state, cfg)
        if epochs - done <= 0 or state.finetune_stopped_early:
            return

        if cfg.lr_finetune == AUTO_LR and cfg.strategy != "scratch":
            log.info("--lr-finetune auto applies to boundary fine-tuning only; the whole network fine-tunes at the "
                     "default %.0e", cfg.finetune_lr)
        unfreeze(model, cfg.unfreeze if cfg.lr_floor is None else None)
        if cfg.strategy == "scratch":
            groups = discriminative_param_groups(model, cfg.lr_head, "none", weight_decay=cfg.weight_decay)
        else:
            groups = discriminative_param_groups(model, cfg.finetune_lr, cfg.lr_decay, weight_decay=cfg.weight_decay,
                                                 last_k=cfg.unfreeze, floor_lr=cfg.lr_floor)
            if cfg.strategy == "full" or not state.frozen_done:
                head_params = {id(p) for p in head_slot(model).parameters()}
                for g in groups:
                    if all(id(p) in head_params for p in g["params"]):
                        g["lr"] = cfg.lr_head  # a fresh head needs the head LR, not the body's
            if cfg.lr_floor is None:  # an explicit floor asks for those tiny LRs: keep every block training
                groups = freeze_negligible_groups(groups, cfg.finetune_lr)
        if decoded is not None and ranks.world_size == 1:  # nothing to do when the feature pass decoded them
            t_fill = time.perf_counter()
            if decoded.prefill([s.path for s in splits.train], [s.path for s in splits.val], eval_view(spec.preprocessing),
                               _runtime.decode_threads()):
                state.add_seconds("decoding", time.perf_counter() - t_fill)
        n_classes, multi = len(splits.classes), splits.multilabel
        train_ds = ImageDataset(splits.train, train_transform(pre, cfg.augment), decoded=decoded,
                                targets=label_targets(splits.train, n_classes, multi) if multi else None)
        # val pixels exactly as evaluate/predict see them, resized once per run (kept since the feature pass)
        val_ds = ImageDataset(splits.val, eval_transform(spec.preprocessing), decoded=decoded, exact_pixels=True,
                              kept_view=eval_view(spec.preprocessing),
                              targets=label_targets(splits.val, n_classes, multi) if multi else None)
        # --batch-size is the global batch (images per optimizer step): each of N processes takes 1/N
        # of it, so a recipe's batch and learning rates mean the same on 1 device or 64.
        batch_size = cfg.batch_size // ranks.world_size
        sampler = EpochSeededSampler(len(train_ds), seed=cfg.seed, start_epoch=done,
                                     rank=ranks.rank, world_size=ranks.world_size)
        drop_last = drops_last_batch(len(sampler), batch_size, cfg.bn_mode)
        # one cycle over this cycle's epochs: the schedule, and progressive sizes, start again in an extension
        cycle_epochs = epochs - cycle
        sizes = progressive_sizes(cfg.img_size, cycle_epochs, cfg.progressive_resize) if cfg.progressive_resize else None
        train_loader = DataLoader(train_ds, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                                  num_workers=cfg.num_workers, pin_memory=accelerator == "cuda",
                                  # workers copy the dataset when they start: new sizes need new workers
                                  persistent_workers=cfg.num_workers > 0 and sizes is None)
        val_sampler = distributed.ShardSampler(len(val_ds), ranks.rank, ranks.world_size) if ranks.world_size > 1 else None
        val_loader = DataLoader(val_ds, batch_size=max(cfg.batch_size, 64), shuffle=False, sampler=val_sampler,
                                num_workers=cfg.num_workers, pin_memory=accelerator == "cuda",
                                persistent_workers=cfg.num_workers > 0)
        steps_per_epoch = len(train_loader)
        module = FineTuneModule(
            model, groups, optimizer=cfg.optimizer, weight_decay=cfg.weight_decay, schedule=cfg.schedule,
            total_steps=steps_per_epoch * cycle_epochs, label_smoothing=cfg.label_smoothing,
            bn_mode=cfg.bn_mode, restore=restore, max_memory=parse_size(cfg.max_memory),
            val_autocast=_validation_autocast(cfg.precision, accelerator, precision),
        )
        patience = cfg.finetune_patience
        early = EarlyStopping(monitor="val_loss", patience=patience, mode="min") if patience > 0 else None
        if early is not None and early_state is not None:
            early.load_state_dict(early_state)
        callback = _RunCallback(self, start_epoch=done, early=early)
        callbacks = [callback] + ([early] if early is not None else [])
        if sizes is not None:
            log.info("progressive resizing: fine-tuning epochs at %s px (validation at %d)", sizes, cfg.eval_size)
            if state.frozen_done and sizes[0] < cfg.img_size:
                # measured on the digits demo (lr 1e-3, no decay): val accuracy fell to chance (0.10)
                log.warning("progressive resizing after the frozen stage: the head was trained on %d px features and "
                            "fine-tuning starts at %d px; with a high --lr-finetune this mismatch can wreck the "
                            "pretrained weights. Prefer it with --strategy full/scratch or a low --lr-finetune.",
                            cfg.img_size, sizes[0])
            callbacks.append(ProgressiveResize(
                train_ds, lambda side: train_transform(pre.with_size(side), cfg.augment), sizes, start_epoch=done - cycle))
        if gate is not None and done < cfg.finetune_gate:
            callbacks.append(gate)
        budget_stop = None
        if deadline is not None:
            budget_stop = budget_mod.TimeBudgetStop(deadline)
            callbacks.append(budget_stop)
        progress = cfg.progress and sys.stderr.isatty()
        if progress:
            from lightning.pytorch.callbacks import RichProgressBar

            callbacks.append(RichProgressBar(leave=False))
        # deterministic without the NaN fill; Lightning would leave deterministic mode on in this process for good
        with _runtime.deterministic_scope():
            trainer = L.Trainer(
                accelerator=accelerator,
                devices=cfg.devices,
                num_nodes=cfg.num_nodes,
                strategy=distributed.trainer_strategy(cfg.dist_strategy, ranks.world_size),
                use_distributed_sampler=False,  # our samplers shard (and seed) the data themselves
                precision=precision,
                max_epochs=epochs - done,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=progress,
                enable_model_summary=False,
                num_sanity_val_steps=0,
                callbacks=callbacks,
                deterministic=accelerator == "cpu",
                log_every_n_steps=max(1, min(50, steps_per_epoch)),
            )
            if rng_to_restore is not None:
                set_rng_state(rng_to_restore["tensors"], rng_to_restore["meta"])
            t0 = time.perf_counter()
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # Lightning vs torch 2.15, harmless
            try:
                trainer.fit(module, train_loader, val_loader)
            except TrainingDiverged as exc:
                good = state.finetune_epochs_done
                kept = (f"the checkpoint of fine-tuning epoch {good} is kept in {checkpoints}" if good
                        else "no fine-tuning epoch finished")
                raise TrainingDiverged(f"{exc} Training stopped; {kept}, and the best model so far "
                                       f"({self.rd.weights_path}) is usable with `transferlab predict`. "
                                       "Train again with a lower --lr-finetune.") from None
            except SystemExit as exc:
                # Lightning turns Ctrl+C into sys.exit(1) after its graceful shutdown; API callers should
                # see an interrupt instead (the last finished epoch is saved: `--resume` continues it).
                if trainer.interrupted:
                    raise KeyboardInterrupt from exc
                raise
        model.to("cpu")
        if not ranks.is_zero:  # rank 0 keeps the run's state
            return
        state.add_seconds("finetune", time.perf_counter() - t0)
        if trainer.should_stop and state.finetune_epochs_done < epochs:
            state.finetune_stopped_early = True
            if (budget_stop is None or not budget_stop.stopped) and (gate is None or not gate.stopped):
                log.info("early stop: val loss did not improve for %d epochs", cfg.finetune_patience)
        state.save()


def _fit_head(model, features, cfg: TrainConfig, on_epoch=None) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """The frozen stage: the head trained on cached (train_x, train_y, val_x, val_y) features, left at its
    best epoch's weights; returns the epoch records and that state."""
    train_x, train_y, val_x, val_y = features
    head = head_slot(model).head
    torch.manual_seed(cfg.seed)  # dropout draws: the same whether features were cached or not
    records, best_state = train_head(
        head, train_x, train_y, val_x, val_y,
        epochs=cfg.epochs_frozen, lr=cfg.lr_head, weight_decay=cfg.weight_decay,
        label_smoothing=cfg.label_smoothing, batch_size=cfg.batch_size, seed=cfg.seed,
        optimizer=cfg.optimizer, constant_lr=cfg.schedule == "constant", on_epoch=on_epoch,
    )
    head.load_state_dict(best_state)
    return records, best_state


def _task_meta(splits: DataSplits) -> dict[str, Any]:
    """model.json's and summary.json's task fields: the task, and for multi-label the label separator."""
    return {"task": splits.task, **({"label_sep": splits.label_sep} if splits.multilabel else {})}


def _tune_thresholds(model, run_dir: Path, splits: DataSplits, spec: BackboneSpec, cfg: TrainConfig,
                     state: RunState, decoded: DecodedImages | None, val_features: torch.Tensor | None) -> None:
    """Per-label thresholds of the best model (model.safetensors) tuned on val by `cfg.thresholds`,
    written into model.json (read by predict, evaluate, export) and the run's state. When the best is the
    frozen stage's head and this process extracted the val features, the head alone scores them: the
    backbone's val pass is the features' (scene15 pairs, 149 val images: the second pass took 15.6 s of a
    316 s run, bench/RESULTS.md)."""
    t0 = time.perf_counter()
    model.load_state_dict(load_tensors(RunDir(run_dir).weights_path))
    if val_features is not None and state.best["phase"] == "frozen":
        head = head_slot(model).head.eval()
        with torch.no_grad():
            probs = head(val_features.float()).float().sigmoid().numpy()
    else:
        probs = thresholds_mod.validation_probabilities(model, splits.val, spec.preprocessing,
                                                        batch_size=max(cfg.batch_size, 64), decoded=decoded)
    targets = label_targets(splits.val, len(splits.classes), True).numpy()
    values, per_label = thresholds_mod.tune_thresholds(probs, targets, splits.classes, cfg.thresholds)
    rd = RunDir(run_dir)
    meta = rd.model_meta()
    meta.update(thresholds=values, threshold_rule=cfg.thresholds)
    atomic_write_json(rd.model_meta_path, meta)
    state.thresholds = {"rule": cfg.thresholds, "per_label": per_label}
    state.phase_seconds["thresholds"] = time.perf_counter() - t0
    state.save()
    log.info("thresholds (%s) tuned on %d val images: %s", cfg.thresholds, len(splits.val),
             ", ".join(f"{name} {v:.2f}" for name, v in zip(splits.classes, values)))


def _finish(run_dir: Path, cfg: TrainConfig, spec: BackboneSpec, splits: DataSplits, state: RunState,
            elapsed: float, extract_precision: str, precision: str, accelerator: str,
            started_at: datetime, decoded: DecodedImages | None = None) -> tuple[dict, list[dict]]:
    if state.best is None:
        raise TransferlabError("Training produced no evaluated epoch; nothing to save.")
    rows = state.rows
    summary = {
        "backbone": spec.name,
        "backbone_source": spec.source,
        "pretrained": spec.pretrained,
        "strategy": cfg.strategy,
        "classes": splits.classes,
        "num_classes": len(splits.classes),
        "num_train": len(splits.train),
        "num_val": len(splits.val),
        "num_test": len(splits.test),
        "val_accuracy_best": state.best["val_accuracy"],
        "val_accuracy_final": rows[-1]["val_accuracy"],
        "best": state.best,
        "phase_seconds": {k: round(v, 3) for k, v in state.phase_seconds.items()},
        "time_budget": state.time_budget,
        "total_seconds": round(elapsed, 3),  # all invocations of this run (a resumed one adds up)
        "started_at": started_at.isoformat(timespec="milliseconds"),  # this invocation, UTC
        "skipped_files": splits.skipped,
        "skipped_count": splits.skipped_count,  # all of them; skipped_files lists the first MAX_LISTED_SKIPS
        "warnings": splits.warnings,
        "img_size": cfg.img_size,
        "eval_size": cfg.eval_size,
        "precision": {"features": extract_precision, "training": precision},
        "accelerator": accelerator,
        "devices": cfg.devices,
        "num_nodes": cfg.num_nodes,
        "dist_strategy": cfg.dist_strategy if cfg.world_size > 1 else None,
        "threads": torch.get_num_threads(),
        "allocator_tuned": _runtime.tune_allocator(),
        "bn_mode": cfg.bn_mode,
        "finetune": state.finetune if state.finetune is not None else (
            {"mode": "full", **({} if cfg.strategy == "scratch" else _lr_record(cfg))}
            if "finetune" in state.phase_seconds else None),
        **({"extensions": state.extensions} if state.extensions else {}),
        "seed": cfg.seed,
        **_task_meta(splits),
        **({"score": "mAP (macro average precision): the accuracy columns and the best-epoch choice use it",
            "thresholds": state.thresholds} if splits.multilabel else {}),
        "versions": {"torch": torch.__version__, "lightning": L.__version__, "python": sys.version.split()[0]},
    }
    rd = RunDir(run_dir)
    rd.write_metrics(rows)
    plot_curves(rows, rd.curves_path, title=f"{spec.name} — {cfg.strategy}")
    atomic_write_json(rd.summary_path, summary)
    # finished only once its summary is written: an extended run keeps its previous summary.json until then
    state.status = "finished"
    state.save()
    evaluated = _calibrate(run_dir, cfg, decoded, multilabel=splits.multilabel)
    if cfg.report:
        _write_report(run_dir, cfg.progress, decoded, evaluated)
    log.info("best val accuracy %.4f (%s epoch %d); run saved to %s", summary["val_accuracy_best"],
             state.best["phase"], state.best["epoch"], run_dir)
    return summary, rows


def _calibrate(run_dir: Path, cfg: TrainConfig, decoded: DecodedImages | None, *, multilabel: bool) -> bool:
    """Evaluate the best model on val, fitting its temperature there (T = 1 with --no-calibrate) and
    keeping the val scores predict's --unknown/--sets use, in model.json; the same pass writes
    eval-val.json for the report. A multi-label model is not temperature-scaled (its per-label
    thresholds were tuned on val). True when it worked; a failure leaves the run uncalibrated (T = 1),
    never lost."""
    from transferlab.evaluation.evaluate import evaluate_run

    try:
        evaluate_run(run_dir, split="val", progress=cfg.progress, decoded=decoded,
                     calibrate=None if multilabel else cfg.calibrate)
    except (TransferlabError, OSError, ValueError, RuntimeError) as exc:
        log.warning("could not calibrate the model on val (%s); it predicts uncalibrated — retry with "
                    "`transferlab evaluate %s --calibrate`", exc, run_dir)
        return False
    return True


def _write_report(run_dir: Path, progress: bool, decoded: DecodedImages | None = None, evaluated: bool = False) -> None:
    """The HTML report, after evaluating the best model on the val split (from the val images this
    run already decoded and resized, when it kept them) unless `evaluated` already did. A failure here
    never costs the trained run."""
    from transferlab.evaluation.evaluate import evaluate_run
    from transferlab.reporting.html import write_report

    try:
        if not evaluated:
            evaluate_run(run_dir, split="val", progress=progress, decoded=decoded)
        path = write_report([run_dir], progress=progress)
        log.info("report: %s", path)
    except (TransferlabError, OSError, ValueError, RuntimeError) as exc:
        log.warning("could not write the report (%s); the run itself is complete — "
                    "retry with `transferlab report %s`", exc, run_dir)


def _print_epoch(row: dict) -> None:
    # at most 71 characters below epoch 100 and loss 10 (3 decimals; whole seconds from 10 s), so that with
    # its level (9) it fits an 80-column terminal on one line; metrics.csv keeps the full figures
    seconds = row["epoch_seconds"]
    log.info("%-8s epoch %2d  loss %.3f acc %.3f  val loss %.3f acc %.3f  %.*fs",
             row["phase"], row["epoch"], row["train_loss"], row["train_accuracy"],
             row["val_loss"], row["val_accuracy"], 1 if seconds < 10 else 0, seconds)


def _plan_boundary_epochs(top: torch.nn.Module, val_x: torch.Tensor, n_train: int, requested: int,
                          deadline: float, autocast, state: RunState) -> int:
    """Under --time-budget, the boundary epochs that fit the time left, planned before the one-cycle
    schedule is built (its length is fixed up front) from the top's forward throughput measured on the
    cached val activations, with the full loop's estimate of a training step; each finished epoch's real
    duration still stops the stage at the deadline."""
    rate = boundary.forward_images_per_second(top, val_x, autocast)
    per_epoch = budget_mod.estimate_epoch_seconds(n_train, len(val_x), rate, extract_precision=_dtype_name(autocast),
                                                  training_precision="32-true")
    left = deadline - time.perf_counter()
    planned = budget_mod.plan_finetune_epochs(requested, left, per_epoch)
    state.time_budget = {**(state.time_budget or {}), "seconds_left_for_finetune": round(left, 3),
                         "estimated_epoch_seconds": round(per_epoch, 3), "planned_finetune_epochs": planned}
    log.info("time budget: %.0fs left, ~%.1fs per boundary fine-tuning epoch -> %d of %d epoch(s)%s", left,
             per_epoch, planned, requested, "" if planned else "; the frozen stage's model is kept")
    return planned


def _dtype_name(autocast) -> str:
    """The precision name budget.estimate_epoch_seconds reads for passes run under `autocast`."""
    return "bf16-mixed" if autocast == torch.bfloat16 else "32-true"


def drops_last_batch(n_images: int, batch_size: int, bn_mode: str) -> bool:
    """Whether an epoch drops its partial last batch. It is kept — 40 images at batch 32 are two steps,
    not one — except a last batch of a single image while BatchNorm trains: batch statistics need two."""
    return bn_mode == "train" and n_images > batch_size and n_images % batch_size == 1


def _plan_finetune(cfg: TrainConfig, splits: DataSplits, state: RunState, elapsed: float,
                   extract_precision: str, precision: str) -> int:
    """Fine-tuning epochs to run: all requested ones, or under --time-budget as many as fit (boundary
    fine-tuning plans its own once its activations are cached: _plan_boundary_epochs)."""
    if cfg.time_budget is None:
        return cfg.epochs_finetune
    budget = parse_duration(cfg.time_budget)
    if cfg.strategy == "two-stage" and cfg.finetune == "boundary":  # planned once its activations are cached
        state.time_budget = {"seconds": budget}
        return cfg.epochs_finetune
    rate = state.forward_images_per_second
    per_epoch = (budget_mod.estimate_epoch_seconds(len(splits.train), len(splits.val), rate,
                                                   extract_precision=extract_precision, training_precision=precision)
                 if rate else None)
    planned = budget_mod.plan_finetune_epochs(cfg.epochs_finetune, budget - elapsed, per_epoch)
    state.time_budget = {"seconds": budget, "seconds_left_for_finetune": round(budget - elapsed, 3),
                                 "estimated_epoch_seconds": None if per_epoch is None else round(per_epoch, 3),
                                 "planned_finetune_epochs": planned}
    if per_epoch is None:
        log.info("time budget %.0fs: %.0fs left, no throughput measured yet — %d fine-tuning epoch(s) planned, "
                 "stopping early if the next would not fit", budget, budget - elapsed, planned)
    else:
        log.info("time budget %.0fs: %.0fs left, ~%.1fs per fine-tuning epoch -> %d of %d epoch(s)",
                 budget, budget - elapsed, per_epoch, planned, cfg.epochs_finetune)
    return planned


def _boundary_plan(model, cfg: TrainConfig, splits: DataSplits,
                   ranks: distributed.Ranks) -> tuple[boundary.BoundarySplit, int, int] | None:
    """(the split, bytes per image's activations, augmented views that fit) when this run fine-tunes on a
    boundary cache; None when it fine-tunes with the full loop (each reason logged by the caller's path)."""
    if (cfg.strategy != "two-stage" or cfg.finetune != "boundary" or cfg.epochs_finetune == 0
            or ranks.world_size > 1):
        return None
    split = boundary.split_model(model, cfg.boundary_stages)
    if split is None:
        return None
    per_image = math.prod(boundary.activation_shape(split.bottom, cfg.eval_size)) * boundary.STORAGE_DTYPE.itemsize
    views = boundary.views_that_fit(cfg.boundary_views, len(splits.train), len(splits.val), per_image)
    return None if views is None else (split, per_image, views)


def _boundary_tap(model, cfg: TrainConfig, splits: DataSplits, ranks: distributed.Ranks,
                  plan: tuple[boundary.BoundarySplit, int, int] | None = None) -> str | None:
    """The name of the module whose output is the boundary, when the feature pass should keep its
    activations: the plain train view and val are then not run through the bottom a second time.
    `plan`: `_boundary_plan`'s answer when the caller has it already."""
    plan = plan or _boundary_plan(model, cfg, splits, ranks)
    if plan is None:
        return None
    return next((name for name, m in model.named_modules() if m is plan[0].bottom[-1]), None)


def _cache_boundary(split: boundary.BoundarySplit, splits: DataSplits, cfg: TrainConfig, spec: BackboneSpec,
                    views: int, decoded: DecodedImages | None, autocast, tapped: dict[str, torch.Tensor] | None,
                    with_val: bool = True) -> tuple[list[torch.Tensor], torch.Tensor | None, bool]:
    """The bottom's activations at the evaluation size: [plain train view, `views` augmented ones], val's
    (None without `with_val`), and whether plain and val came from the feature pass (`tapped`)."""
    size = cfg.eval_size
    bottom = folded_for_inference(copy.deepcopy(split.bottom).eval(), size)
    bottom.to(memory_format=torch.channels_last)
    val_ds = ImageDataset(splits.val, eval_transform(spec.preprocessing), decoded=decoded, exact_pixels=True,
                          kept_view=eval_view(spec.preprocessing))
    # views at the evaluation size: the top trains at the scale it is validated and used at
    train_ds = ImageDataset(splits.train, train_transform(spec.preprocessing, cfg.augment), decoded=decoded)
    batch = max(cfg.batch_size, 64)
    tapped = tapped or {}
    reuse = {k: tapped.get(k) for k in ("train", "val")}
    expected = boundary.activation_shape(split.bottom, size)
    for k, n in (("train", len(splits.train)), ("val", len(splits.val))):
        if reuse[k] is not None and tuple(reuse[k].shape) != (n, *expected):
            reuse[k] = None  # not this split's activations (cannot happen in one run; never trust it blindly)
    total = (with_val and reuse["val"] is None) * len(splits.val) + (views + (reuse["train"] is None)) * len(splits.train)
    with progress_bar(cfg.progress, f"caching {split.cut}-stage boundary", total) as advance:
        val_x = reuse["val"]
        if val_x is None and with_val:
            val_x = boundary.cache_activations(bottom, val_ds, batch_size=batch, autocast=autocast, progress=advance)
        plain = reuse["train"]
        if plain is None:
            plain_ds = ImageDataset(splits.train, eval_transform(spec.preprocessing), decoded=decoded, exact_pixels=True)
            plain = boundary.cache_activations(bottom, plain_ds, batch_size=batch, autocast=autocast,
                                               num_workers=cfg.num_workers, progress=advance)
        # the plain view is one of the views: the head was fitted on it, and it is what val looks like
        view_x = [plain]
        for v in range(1, views + 1):
            torch.manual_seed(cfg.seed * 1000 + 500 + v)
            view_x.append(boundary.cache_activations(bottom, train_ds, batch_size=batch, autocast=autocast,
                                                     num_workers=cfg.num_workers, progress=advance))
    return view_x, val_x, reuse["train"] is not None and reuse["val"] is not None


# The new head's LR over the body's while the boundary top trains: the head was fitted to the frozen
# features and has to follow the stages below it as they move.
HEAD_LR_MULTIPLIER = 3.0

# --lr-finetune auto: the range test runs this many steps at most, two epochs' worth when fewer; under
# AUTO_LR_MIN_STEPS (a handful of batches) the curve is too short to read and the default LR is used.
AUTO_LR_MAX_STEPS = 100
AUTO_LR_MIN_STEPS = 20


def _lr_record(cfg: TrainConfig) -> dict[str, Any]:
    """What the summary says of the fine-tuning LR when no range test ran: the user's, or the default
    (with why, when 'auto' was asked for but does not apply)."""
    lr = cfg.finetune_lr
    if cfg.lr_finetune is None:
        return {"lr": lr, "lr_source": "default"}
    if cfg.lr_finetune == AUTO_LR:
        return {"lr": lr, "lr_source": "default",
                "lr_reason": "--lr-finetune auto applies to boundary fine-tuning only"}
    return {"lr": lr, "lr_source": "user"}


def _boundary_lr(top: torch.nn.Module, views: list[torch.Tensor], train_y: torch.Tensor,
                 cfg: TrainConfig) -> tuple[float, dict[str, Any]]:
    """The body's peak LR for the boundary top and its record for the summary. With --lr-finetune auto:
    an LR range test of the top on the cached views (seeded, the top left unchanged) and its suggestion,
    else the boundary default with the reason."""
    if cfg.lr_finetune != AUTO_LR:
        return cfg.finetune_lr, _lr_record(cfg)
    default = DEFAULT_LR_FINETUNE["boundary"]
    epoch_steps = max(1, math.ceil(len(train_y) / cfg.batch_size))
    steps = min(AUTO_LR_MAX_STEPS, 2 * epoch_steps)
    if steps < AUTO_LR_MIN_STEPS:
        reason = (f"{len(train_y)} train images make {epoch_steps} step(s) an epoch at batch size {cfg.batch_size}: "
                  f"too few for an LR range test (it needs {AUTO_LR_MIN_STEPS})")
        log.info("--lr-finetune auto: %s; fine-tuning at the default %.0e", reason, default)
        return default, {"lr": default, "lr_source": "default", "lr_reason": reason}
    t0 = time.perf_counter()
    result = boundary.range_test_top(top, views, train_y, head_lr_multiplier=HEAD_LR_MULTIPLIER,
                                     weight_decay=cfg.weight_decay, label_smoothing=cfg.label_smoothing,
                                     batch_size=cfg.batch_size, seed=cfg.seed, num_steps=steps)
    seconds = round(time.perf_counter() - t0, 3)
    test = {"lr_find": {"steps": len(result.lrs), "method": result.method, "stopped": result.stopped,
                        "suggestion": result.suggestion, "seconds": seconds}}
    if result.suggestion is None:
        reason = "the LR range test's loss never fell" + (f" (stopped: {result.stopped})" if result.stopped else "")
        log.info("--lr-finetune auto: %s; fine-tuning at the default %.0e", reason, default)
        return default, {"lr": default, "lr_source": "default", "lr_reason": reason, **test}
    log.info("--lr-finetune auto: the LR range test (%d steps, %s, %.1fs) suggests %.2e for the body (head %.2e)",
             len(result.lrs), result.method, seconds, result.suggestion, result.suggestion * HEAD_LR_MULTIPLIER)
    return result.suggestion, {"lr": result.suggestion, "lr_source": "auto", **test}


def _validation_autocast(requested: str, accelerator: str, training_precision: str) -> torch.dtype | None:
    """Fine-tuning's per-epoch validation in the frozen features' precision when training runs in full
    precision only because bf16 backward is slow (CPUs with native bf16); None otherwise (Lightning's
    own precision then applies to validation too)."""
    if training_precision != "32-true":
        return None
    return _runtime.autocast_dtype(_runtime.resolve_precision(requested, accelerator, training=False))


NEGLIGIBLE_LR_RATIO = 1e-3


def freeze_negligible_groups(groups: list[dict], top_lr: float) -> list[dict]:
    """Freeze blocks whose decayed LR is under 1/1000 of the top rate (exp:3 reaches it 7 blocks
    below the top). They could not move measurably in a few epochs, yet autograd would still run the
    backward pass through them — the early, high-resolution blocks that cost the most."""
    kept = []
    for g in groups:
        if g["lr"] < top_lr * NEGLIGIBLE_LR_RATIO:
            for p in g["params"]:
                p.requires_grad_(False)
        else:
            kept.append(g)
    frozen = len(groups) - len(kept)
    if frozen:
        log.info("fine-tuning: %d parameter group(s) below %.0e x the top LR stay frozen", frozen, NEGLIGIBLE_LR_RATIO)
    return kept


class EpochSeededSampler(torch.utils.data.Sampler[int]):
    """Shuffles with a seed derived from (seed, epoch) and seeds torch's RNG at the start of each
    epoch's data, so augmentation and dropout too depend only on the epoch — a resumed run replays
    exactly the epochs an uninterrupted one would have, whatever happened before.

    Over `world_size` processes every rank draws the same permutation, padded (with its first
    items, as torch's DistributedSampler) to a multiple of world_size, and takes every
    world_size-th item from `rank` on: each sample is seen once per epoch over all ranks, and
    global batch b of one process is the union of the ranks' batches b."""

    def __init__(self, n: int, seed: int, start_epoch: int = 0, *, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.seed, self.epoch = n, seed, start_epoch
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return math.ceil(self.n / self.world_size)

    def __iter__(self):
        self.epoch += 1
        epoch_seed = self.seed * 100_003 + self.epoch
        torch.manual_seed(epoch_seed + 7919 * self.rank)  # each rank its own augmentation draws
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(epoch_seed)).tolist()
        padded = order + order[: len(self) * self.world_size - self.n]
        return iter(padded[self.rank :: self.world_size])


class _RunCallback(L.Callback):
    """After each fine-tuning epoch: a metrics row, the best model, and a resumable checkpoint."""

    def __init__(self, flow: TrainingFlow, start_epoch: int, early) -> None:
        self.flow, self.state, self.run_dir = flow, flow.state, flow.run_dir
        self.record, self.maybe_save_best = flow.record, flow.maybe_save_best
        self.start_epoch = start_epoch
        self.early = early
        self.t0 = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.t0 = time.perf_counter()
        pl_module.reset_epoch_stats()

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        s = pl_module.stats
        s["val_loss"], s["val_correct"], s["val_n"] = 0.0, 0, 0

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        # Through the strategy: under FSDP gathering the full weights is a collective every rank
        # joins (rank 0 receives them); under DDP or one device it is a plain state_dict().
        weights = {k.removeprefix("model."): v for k, v in trainer.strategy.lightning_module_state_dict().items()}
        optimizer_state = trainer.strategy.optimizer_state(trainer.optimizers[0])
        epoch = self.start_epoch + trainer.current_epoch + 1
        metrics = pl_module.epoch_metrics()
        if not math.isfinite(metrics["val_loss"]) and pl_module.stats["val_n"]:
            # weights that give a NaN loss must not overwrite the last good checkpoint (checked on
            # every rank: the weights are the same everywhere, so all ranks stop together)
            raise TrainingDiverged(f"Training diverged: the validation loss became {metrics['val_loss']} "
                                   f"after fine-tuning epoch {epoch}.")
        if not trainer.is_global_zero:
            return
        # the highest LR of the epoch's last step (the head's or the top block's); the last group is the
        # deepest block's, decayed to ~1e-10 under exp:3 — not what a reader of the column wants
        lr = max(g["lr"] for g in trainer.optimizers[0].param_groups)
        self.record("finetune", {"epoch": epoch, **metrics, "lr": lr, "epoch_seconds": time.perf_counter() - self.t0})
        self.maybe_save_best("finetune", epoch, metrics["val_accuracy"], metrics["val_loss"], weights)
        trees = {
            "optimizer": optimizer_state,
            "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
        }
        if self.early is not None:
            trees["early_stopping"] = dict(self.early.state_dict())
        self.state.finetune_epochs_done = epoch
        # The checkpoint carries the run state too: it is the commit point of the epoch, so a kill
        # between it and state.json loses nothing (resume takes the newer of the two).
        save_training_state(RunDir(self.run_dir).checkpoints / "last", weights, trees,
                            {"epoch": epoch, "run_state": self.state.to_dict()})
        self.state.save()
        self.flow.rd.write_metrics(self.state.rows)
