"""The resolved training configuration: one dataclass, written to the run directory as config.yaml."""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from transferlab.errors import RunDirError, TransferlabError

STRATEGIES = ("two-stage", "head-only", "full", "scratch")
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("onecycle", "cosine", "constant")
BN_POLICIES = ("auto", "eval", "train")
# How two-stage runs fine-tune after the head: the top stages on a boundary cache (training/boundary.py),
# or the whole network (its top blocks by --lr-decay) re-run on every image every epoch (training/finetune.py).
FINETUNE_MODES = ("boundary", "full")
FINETUNE_WHEN = ("underfit", "always")  # --finetune boundary: run it only when the head underfits, or always
# Peak fine-tuning LR by mode when --lr-finetune is not given: the boundary top starts from pretrained
# stages right below a trained head and moves them for a few epochs; the full loop's 1e-4 decays from it.
DEFAULT_LR_FINETUNE = {"boundary": 1e-3, "full": 1e-4}
# Fine-tuning epochs without a val-loss gain before it stops, by mode when --early-stop is not given. The
# boundary stage counts only once an epoch has beaten the head (its first epochs, near the one-cycle
# peak, may dip below it): on potato_leaf its val loss rose from epoch 3 while accuracy stayed tied, and
# the two epochs after the best were 29 % of the run, thrown away (bench/RESULTS.md).
DEFAULT_EARLY_STOP = {"boundary": 1, "full": 3}
# --lr-finetune auto: the boundary stage's peak LR from an LR range test on the cached activations
# (training/lr_find.py) run right before its epochs; the full loop keeps DEFAULT_LR_FINETUNE["full"].
AUTO_LR = "auto"
PREPROCESS_KEYS = ("mean", "std", "interpolation", "crop_pct", "crop_mode")
# Lightning strategies for spreading a run over devices/nodes ("auto": one device → none, several → DDP).
DIST_STRATEGIES = ("auto", "ddp", "fsdp")
# Lightning's precision names the run accepts, and what people type for them instead.
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")
PRECISION_ALIASES = {"32": "32-true", "fp32": "32-true", "float32": "32-true", "bf16": "bf16-mixed",
                     "bfloat16": "bf16-mixed", "16": "16-mixed", "fp16": "16-mixed", "float16": "16-mixed",
                     "half": "16-mixed", "amp": "16-mixed", "64": "64-true", "fp64": "64-true"}
DEVICES = ("auto", "cpu", "cuda", "gpu", "mps")
# --logger: Lightning loggers that also get the run's config, epoch rows and final figures
# (training/tracking.py): name -> (modules of which one must be importable, the pip extra installing it).
LOGGERS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "csv": ((), None),
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "mlflow": (("mlflow",), "mlflow"),
}


_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0}


def parse_duration(text: str | float) -> float:
    """'90s', '2m', '1h30m', '1.5h' or plain seconds -> seconds (> 0)."""
    import re

    if isinstance(text, int | float):
        seconds = float(text)
    else:
        raw = str(text).strip().lower().replace(" ", "")
        parts = re.fullmatch(r"((?:\d+(?:\.\d+)?[hms])+|\d+(?:\.\d+)?)", raw)
        if not parts:
            raise ValueError(f"time budget '{text}' is not a duration like 90s, 2m, 1h30m")
        if raw[-1].isdigit():
            seconds = float(raw)
        else:
            seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([hms])", raw))
    if seconds <= 0:
        raise ValueError(f"time budget '{text}' must be > 0")
    return seconds


SIZE_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str | int | None) -> int | None:
    """'8G', '512M', '1.5GiB', '800MB', 123456 → bytes (binary units); None/'' → None."""
    import re

    if text is None or text == "":
        return None
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(?:I?B)?\s*", str(text).upper())
    if not match or float(match[1]) <= 0:
        raise ValueError(f"max_memory '{text}' is not a size such as 8G, 512M or 1.5GB")
    return int(float(match[1]) * SIZE_UNITS[match[2]])


def split_names(values: str | Iterable[str] | None) -> list[str]:
    """'a,b' or ['a', 'b,c'] (a repeated option, each maybe a comma list) -> ['a', 'b', 'c']: stripped,
    empty items dropped, first occurrence kept."""
    items = [values] if isinstance(values, str) else list(values or [])
    return list(dict.fromkeys(name.strip() for item in items for name in str(item).split(",") if name.strip()))


def _positive_number(value: Any) -> bool:
    import math

    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def parse_lr_finetune(text: str | float | None) -> float | str | None:
    """--lr-finetune's value: a number (as text or not) or 'auto'; anything else is returned unchanged,
    for `TrainConfig.validate` to reject with its message."""
    if text is None or isinstance(text, int | float):
        return text
    raw = str(text).strip()
    if raw.lower() == AUTO_LR:
        return AUTO_LR
    try:
        return float(raw)
    except ValueError:
        return raw


# --help panels: `train` and `lr-find` group their options by what they decide, in this order (an option
# without one lands in typer's default "Options" panel).
MODEL, TRAINING, FINETUNE, DATA = "Model", "Training", "Fine-tuning (after the head)", "Data"
HARDWARE, OUTPUT, TRACKING = "Hardware and caches", "Output and run", "Experiment tracking"
PANELS = (MODEL, TRAINING, FINETUNE, DATA, HARDWARE, OUTPUT, TRACKING)


@dataclass(frozen=True)
class Option:
    """How a TrainConfig field shows on the command line. `flags` and `metavar` only where typer's spelling
    from the field's name is not the one wanted; `cli_type` where the command line reads another type than
    the field holds (a path, kept as text; --lr-finetune's text, read by parse_lr_finetune)."""

    help: str
    panel: str
    flags: tuple[str, ...] = ()
    metavar: str | None = None
    cli_type: Any = None


def option(panel: str, help: str, *, flags: tuple[str, ...] = (), metavar: str | None = None,
           cli_type: Any = None) -> dict[str, Option]:
    """The metadata of a TrainConfig field that is also a `train` option: `field(default=..., metadata=option(
    PANEL, HELP))` keeps its help text and --help panel beside its default, read by the command line."""
    return {"option": Option(help, panel, tuple(flags), metavar, cli_type)}


def internal(why: str) -> dict[str, str]:
    """The metadata of a TrainConfig field that is no `train` option of its own (`why` says how it is set)."""
    return {"internal": why}


def option_fields() -> list[dataclasses.Field]:
    """TrainConfig's command-line options, panel by panel (PANELS order), in field order within a panel."""
    fields = [f for f in dataclasses.fields(TrainConfig) if "option" in f.metadata]
    return sorted(fields, key=lambda f: PANELS.index(f.metadata["option"].panel))


def _lr(value: float) -> str:
    """1e-3, not 0.001: a learning rate as people write it."""
    return f"{value:.0e}".replace("e-0", "e-")


def field_default(f: dataclasses.Field) -> Any:
    """A field's default value (a fresh one for a default_factory)."""
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


@dataclass
class TrainConfig:
    """Everything that decides a run. Defaults are the measured fastest recipe that keeps accuracy; each
    option's help text and --help panel sit beside its default (`option`), read by the command line."""

    data: str = field(default="", metadata=internal("the command's DATA argument"))
    out: str | None = field(default=None, metadata=option(
        OUTPUT, "Run directory (default: a new folder in runs/ named by time and backbone)", flags=("--out", "-o"),
        cli_type=Path | None))
    # model
    backbone: str = field(default="efficientnet_lite0", metadata=option(
        MODEL, "Backbone: efficientnet_lite0|1|2 (offline), any timm name, hf-hub:ID, or tv:NAME"))
    pretrained: bool = field(default=True, metadata=option(MODEL, "Load pretrained weights"))
    head: str = field(default="linear", metadata=option(MODEL, "linear | mlp"))
    head_hidden: int = field(default=512, metadata=option(MODEL, "MLP head hidden size"))
    head_dropout: float = field(default=0.2, metadata=option(MODEL, "Dropout before the head's last layer"))
    img_size: int | None = field(default=None, metadata=option(MODEL, "Training input size (default: the backbone's)"))
    # Resolution of frozen features, validation, prediction and export; default: the backbone's test
    # size when it has a measured one and img_size is not set (efficientnet_lite0: 288), else img_size.
    eval_size: int | None = field(default=None, metadata=option(
        MODEL, "Size for frozen features, validation and prediction (default: the backbone's measured test size, 288 "
        "for efficientnet_lite0, else --img-size)"))
    # schedule
    strategy: str = field(default="two-stage", metadata=option(TRAINING, "two-stage | head-only | full | scratch"))
    epochs_frozen: int = field(default=16, metadata=option(TRAINING, "Head epochs on cached frozen features"))
    epochs_finetune: int = field(default=4, metadata=option(TRAINING, "Fine-tuning epochs"))
    finetune: str = field(default="boundary", metadata=option(
        FINETUNE, "Two-stage fine-tuning: boundary (the top stages on cached activations) | full (the whole network, "
        "every epoch)"))
    boundary_stages: int = field(default=2, metadata=option(FINETUNE, "--finetune boundary: train the last N stages"))
    boundary_views: int = field(default=0, metadata=option(
        FINETUNE, "--finetune boundary: augmented views of each train image cached beside the plain one (0: the plain "
        "view alone)"))
    finetune_when: str = field(default="underfit", metadata=option(
        FINETUNE, "--finetune boundary: underfit (only when the head's train error is at least half its val error) | "
        "always"))
    lr_head: float = field(default=1e-3, metadata=option(TRAINING, "Head learning rate"))
    lr_finetune: float | str | None = field(default=None, metadata=option(
        FINETUNE, f"Peak fine-tuning learning rate (top block; default {_lr(DEFAULT_LR_FINETUNE['boundary'])} for "
        f"--finetune boundary, {_lr(DEFAULT_LR_FINETUNE['full'])} for full), or {AUTO_LR}: an LR range test "
        "on the boundary cache picks it", cli_type=str | None))
    lr_decay: str = field(default="exp:3", metadata=option(
        FINETUNE, "Per-block LR toward the input: none | exp:F | linear:LOW | layer:D"))
    unfreeze: int | None = field(default=None, metadata=option(
        FINETUNE, "Unfreeze only the last K blocks (default: all)"))
    # LR for the backbone blocks --unfreeze leaves out, instead of freezing them (and no block is
    # frozen for a negligible LR): the published Flowers-102 recipe gives such parameters 1e-8.
    lr_floor: float | None = field(default=None, metadata=option(
        FINETUNE, "LR for the blocks --unfreeze leaves out, instead of freezing them (e.g. 1e-8)"))
    optimizer: str = field(default="adamw", metadata=option(TRAINING, "adamw | adam | sgd"))
    weight_decay: float = field(default=1e-2, metadata=option(TRAINING, "Weight decay (not on biases/norms)"))
    schedule: str = field(default="onecycle", metadata=option(TRAINING, "onecycle | cosine | constant"))
    label_smoothing: float = field(default=0.1, metadata=option(TRAINING, "Label smoothing"))
    early_stop: int | None = field(default=None, metadata=option(
        FINETUNE, f"Stop fine-tuning after N epochs without val-loss gain (0: off; default "
        f"{DEFAULT_EARLY_STOP['boundary']} for --finetune boundary, counted once an epoch beat the head, "
        f"{DEFAULT_EARLY_STOP['full']} for full)"))
    # two-stage: fine-tuning stops after this many epochs unless one beat the frozen stage's val
    # loss (ants/bees: it never does). Two, not one: the first epoch of the one-cycle schedule ends
    # near its peak LR, where the digits demo's val loss is still above the head's at seeds 0, 1, 2
    # (0.44-0.56 vs 0.40-0.45) before epoch 2 beats it (0.17-0.21, 0.986-0.992 after 3). 0: every epoch runs.
    finetune_gate: int = field(default=2, metadata=option(
        FINETUNE, "Two-stage: stop fine-tuning after N epochs unless one beat the frozen stage's val loss (0: off)"))
    progressive_resize: float | None = field(default=None, metadata=option(
        FINETUNE, "Fine-tune from this fraction of the image size up to full (e.g. 0.5)"))
    time_budget: str | None = field(default=None, metadata=option(
        TRAINING, "Whole-run time budget, e.g. 2m, 90s, 1h30m: fine-tuning epochs are planned to fit"))
    bn: str = field(default="auto", metadata=option(FINETUNE, "BatchNorm while fine-tuning: auto | eval | train"))
    # data
    augment: str = field(default="standard", metadata=option(
        DATA, "none | light | standard | strong | classic | padcrop (train only)"))
    # Overrides of the backbone's preprocessing (mean, std, interpolation, crop_pct, crop_mode), e.g. a
    # dataset's own normalisation; saved in model.json, so predict/export reproduce it.
    preprocess: dict[str, Any] = field(default_factory=dict, metadata=internal(
        "a mapping: --config, or --set 'preprocess={crop_pct: 1.0}'"))
    feature_views: int = field(default=0, metadata=option(DATA, "Extra augmented views cached for the head stage"))
    val_split: float = field(default=0.2, metadata=option(DATA, "Validation fraction when the data has no val/ folder"))
    csv_anywhere: bool = field(default=False, metadata=option(
        DATA, "Let a CSV's rows name files outside the CSV's folder", flags=("--csv-anywhere",)))
    # a run's config.yaml holds the task it resolved to, so --resume and evaluate read the data alike
    task: str = field(default="auto", metadata=option(
        DATA, "auto (multilabel when a CSV cell lists several labels) | single | multilabel (sigmoid per label, "
        "thresholds tuned on val)"))
    label_sep: str | None = field(default=None, metadata=option(
        DATA, "Multi-label CSV: the character separating a cell's labels (default: ';' or '|', detected)"))
    thresholds: str = field(default="f1", metadata=option(
        TRAINING, "Multi-label: per-label thresholds on val maximise f1, or reach precision:P (e.g. precision:0.9)"))
    batch_size: int = field(default=32, metadata=option(DATA, "Batch size"))
    num_workers: int | None = field(default=None, metadata=option(DATA, "Data-loader workers (default: by core count)"))
    decode_cache: bool = field(default=True, metadata=option(
        DATA, "Keep decoded images in memory across epochs (in-process loading only)"))
    compile: str = field(default="auto", metadata=option(
        HARDWARE, "torch.compile the frozen forward: auto (CPU, >= 20k images) | on | off"))
    decode_cache_mb: float = field(default=2048.0, metadata=internal(
        "a tuning knob of --decode-cache: --set or --config"))
    # machinery
    seed: int = field(default=0, metadata=option(TRAINING, "Random seed"))
    precision: str = field(default="auto", metadata=option(HARDWARE, "auto | 32-true | bf16-mixed | 16-mixed"))
    device: str = field(default="auto", metadata=option(HARDWARE, "auto | cpu | cuda | mps"))
    devices: int = field(default=1, metadata=option(
        HARDWARE, "Devices (processes) per node; >1 runs DDP/FSDP through Lightning"))
    num_nodes: int = field(default=1, metadata=option(
        HARDWARE, "Nodes (machines); launch with torchrun or SLURM srun, see README"))
    dist_strategy: str = field(default="auto", metadata=option(
        HARDWARE, "How fine-tuning spreads over devices: auto | ddp | fsdp (--strategy is the training recipe)"))
    feature_cache: str = field(default="disk", metadata=option(HARDWARE, "disk | memory"))
    cache_dir: str | None = field(default=None, metadata=option(
        HARDWARE, "Feature cache directory", cli_type=Path | None))
    max_memory: str | None = field(default=None, metadata=option(
        HARDWARE, "Activation memory per pass, e.g. 8G; over it (or on out-of-memory) batches are halved"))
    progress: bool = field(default=True, metadata=option(OUTPUT, "Progress bars on an interactive terminal"))
    report: bool = field(default=True, metadata=option(OUTPUT, "Write report.html at the end"))
    loggers: list[str] = field(default_factory=list, metadata=option(
        TRACKING, "Also send the config, every epoch and the results to: csv | tensorboard | mlflow (repeatable or "
        "comma-separated). The last two need pip install 'transferlab\\[tensorboard]' or 'transferlab\\[mlflow]'",
        flags=("--logger",), metavar="NAME"))
    calibrate: bool = field(default=True, metadata=option(
        TRAINING, "Fit temperature scaling on the val logits after training (predict, evaluate and exports apply it)"))
    extra: dict[str, Any] = field(default_factory=dict, metadata=internal("a free-form mapping: --config or --set"))

    def __post_init__(self) -> None:
        self.loggers = split_names(self.loggers)  # the API may pass "csv,tensorboard" as --logger takes it

    def validate(self) -> None:
        """Reject contradictory or impossible settings before any work starts."""
        def bad(msg: str) -> None:
            raise TransferlabError(f"Invalid configuration: {msg}")

        if self.strategy not in STRATEGIES:
            bad(f"strategy '{self.strategy}' is not one of {', '.join(STRATEGIES)}")
        if self.optimizer not in OPTIMIZERS:
            bad(f"optimizer '{self.optimizer}' is not one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            bad(f"schedule '{self.schedule}' is not one of {', '.join(SCHEDULES)}")
        if self.bn not in BN_POLICIES:
            bad(f"bn '{self.bn}' is not one of {', '.join(BN_POLICIES)}")
        if self.head not in ("linear", "mlp"):
            bad(f"head '{self.head}' must be 'linear' or 'mlp'")
        if self.finetune_when not in FINETUNE_WHEN:
            bad(f"finetune_when '{self.finetune_when}' is not one of {', '.join(FINETUNE_WHEN)}")
        if self.finetune not in FINETUNE_MODES:
            bad(f"finetune '{self.finetune}' is not one of {', '.join(FINETUNE_MODES)}")
        if self.boundary_stages < 1 or self.boundary_views < 0:
            bad("boundary_stages must be >= 1 and boundary_views >= 0 (0: the plain view alone)")
        if self.feature_cache not in ("disk", "memory"):
            bad("feature_cache must be 'disk' or 'memory'")
        if self.epochs_frozen < 0 or self.epochs_finetune < 0:
            bad("epoch counts must be >= 0")
        if self.strategy in ("two-stage", "head-only") and self.epochs_frozen == 0 and self.epochs_finetune == 0:
            bad("nothing to train: both --epochs-frozen and --epochs-finetune are 0")
        if self.strategy == "head-only" and self.epochs_frozen == 0:
            bad("strategy head-only needs --epochs-frozen > 0")
        if self.strategy in ("full", "scratch") and self.epochs_finetune == 0:
            bad(f"strategy {self.strategy} needs --epochs-finetune > 0")
        if not 0.0 < self.val_split < 1.0:
            bad("val_split must be between 0 and 1")
        if self.batch_size < 1:
            bad("batch_size must be >= 1")
        from transferlab.data.multilabel import check_rule, check_task
        from transferlab.errors import DataError

        try:
            check_task(self.task, self.label_sep)
        except DataError as exc:
            bad(str(exc))
        if (why := check_rule(self.thresholds)) is not None:
            bad(why)
        if self.task == "multilabel" and self.world_size > 1:
            bad("multi-label runs train on one device (their mAP is computed over the whole val set in one "
                "process): drop --devices/--num-nodes")
        if self.precision not in PRECISIONS:
            hint = PRECISION_ALIASES.get(str(self.precision).lower())
            bad(f"precision '{self.precision}' is not one of {', '.join(PRECISIONS)}"
                + (f" (for '{self.precision}' write '{hint}')" if hint else ""))
        if self.device not in DEVICES:
            bad(f"device '{self.device}' is not one of {', '.join(DEVICES)}")
        from transferlab._runtime import device_unavailable

        if (why := device_unavailable(self.device)) is not None:
            bad(why)
        from transferlab.data.transforms import AUGMENT_PRESETS

        if self.augment not in AUGMENT_PRESETS:
            bad(f"augment '{self.augment}' is not one of {', '.join(AUGMENT_PRESETS)}")
        if self.dist_strategy not in DIST_STRATEGIES:
            bad(f"dist_strategy '{self.dist_strategy}' is not one of {', '.join(DIST_STRATEGIES)}")
        if self.devices < 1 or self.num_nodes < 1:
            bad("devices and num_nodes must be >= 1")
        if self.batch_size % self.world_size:
            bad(f"batch_size {self.batch_size} is the global batch (images per optimizer step) and must "
                f"divide evenly over {self.world_size} processes ({self.devices} devices x {self.num_nodes} nodes)")
        if self.time_budget is not None:
            try:
                parse_duration(self.time_budget)
            except ValueError as exc:
                bad(str(exc))
        if self.progressive_resize is not None and not 0.0 < self.progressive_resize <= 1.0:
            bad("progressive_resize is the starting fraction of the image size, in (0, 1]")
        if self.compile not in ("auto", "on", "off"):
            bad(f"compile '{self.compile}' is not one of auto, on, off")
        if self.decode_cache_mb < 0:
            bad("decode_cache_mb must be >= 0")
        from transferlab.data.transforms import MAX_INPUT_SIZE, Preprocessing

        if self.img_size is not None and not 16 <= self.img_size <= MAX_INPUT_SIZE:
            bad(f"img_size must be from 16 to {MAX_INPUT_SIZE} pixels")
        if self.early_stop is not None and self.early_stop < 0:
            bad("early_stop must be >= 0 (0 turns it off)")
        if self.finetune_gate < 0:
            bad("finetune_gate must be >= 0 (0 turns it off)")
        if self.eval_size is not None and not 16 <= self.eval_size <= MAX_INPUT_SIZE:
            bad(f"eval_size must be from 16 to {MAX_INPUT_SIZE} pixels")
        if self.max_memory is not None:
            try:
                parse_size(self.max_memory)
            except ValueError as exc:
                bad(str(exc))
        if self.lr_head <= 0:
            bad("lr_head must be > 0")
        if self.lr_finetune is not None and self.lr_finetune != AUTO_LR and not _positive_number(self.lr_finetune):
            bad(f"lr_finetune must be a number > 0 or '{AUTO_LR}', got {self.lr_finetune!r}")
        if self.lr_floor is not None and self.lr_floor <= 0:
            bad("lr_floor must be > 0 (leave it unset to freeze the blocks --unfreeze leaves out)")
        unknown = set(self.preprocess) - set(PREPROCESS_KEYS)
        if unknown:
            bad(f"preprocess keys {', '.join(sorted(unknown))} are not among {', '.join(PREPROCESS_KEYS)} "
                "(the input size is img_size)")
        try:
            Preprocessing.from_dict(self.preprocess)
        except (TypeError, ValueError) as exc:
            bad(f"preprocess: {exc}")
        for name in self.loggers:
            if name not in LOGGERS:
                bad(f"logger '{name}' is not one of {', '.join(LOGGERS)}")
            modules, extra = LOGGERS[name]
            if modules and not any(importlib.util.find_spec(m) for m in modules):
                bad(f"logger '{name}' needs the '{modules[0]}' package: pip install 'transferlab[{extra}]'")
        from transferlab.models.param_groups import parse_decay

        try:
            parse_decay(self.lr_decay)
        except ValueError as exc:
            bad(str(exc))

    @property
    def bn_mode(self) -> str:
        """BatchNorm policy while fine-tuning. 'auto': frozen statistics (eval) for pretrained
        backbones — measured: train-mode BN collapsed digits val accuracy 0.958 → 0.65 after one
        epoch, eval-mode BN reached 0.989 — but trained statistics when learning from scratch."""
        if self.bn != "auto":
            return self.bn
        return "train" if (self.strategy == "scratch" or not self.pretrained) else "eval"

    @property
    def finetune_lr(self) -> float:
        """The peak fine-tuning LR: --lr-finetune, else the --finetune mode's default (also for 'auto',
        whose measured LR the boundary stage finds itself, right before its epochs)."""
        if self.lr_finetune is None or self.lr_finetune == AUTO_LR:
            return DEFAULT_LR_FINETUNE[self.finetune]
        return float(self.lr_finetune)

    @property
    def finetune_patience(self) -> int:
        """Fine-tuning epochs without a val-loss gain before it stops (0: never): --early-stop, else
        the --finetune mode's default."""
        return DEFAULT_EARLY_STOP[self.finetune] if self.early_stop is None else self.early_stop

    @property
    def world_size(self) -> int:
        """Processes taking part in the run: devices per node x nodes."""
        return self.devices * self.num_nodes

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        from transferlab.io import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        unknown = unknown_options(d)
        if unknown:
            raise TransferlabError(f"Unknown configuration keys: {unknown}")
        return cls(**d)

    @classmethod
    def from_options(cls, verb: str, data: str | Path | None, options: dict[str, Any]) -> TrainConfig:
        """The configuration for `data` and a caller's keyword options (the Python API's), each name
        checked first: a typo gets the closest names."""
        if data is None:
            raise TransferlabError(f"{verb} needs a data path (a folder of images or a CSV file)")
        unknown = unknown_options(options)
        if unknown:
            raise TransferlabError(f"Unknown training option(s): {unknown}")
        return cls(data=str(data), **options)

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        """config.yaml as `save` wrote it. A file that is not that (a YAML syntax error, a tag such as
        `!!python/object` that safe_load refuses, a value of the wrong type) is a RunDirError naming
        the file and the fault, never a traceback."""
        return cls.from_dict(read_options(path, RunDirError, "Fix or delete the damaged file (it is the "
                                          "configuration `train` wrote for this run)."))


def read_options(path: str | Path, error: type[TransferlabError] = TransferlabError, hint: str = "") -> dict[str, Any]:
    """A YAML mapping of TrainConfig fields (a run's config.yaml, or `train --config FILE`), every name and
    type checked: anything else is `error` naming the file and the fault."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        reason = " ".join(str(exc).split())
        raise error(f"Cannot read {path}: {reason}. {hint}".rstrip()) from None
    if not isinstance(data, dict):
        raise error(f"Cannot read {path}: it holds a YAML {type(data).__name__}, not training options.")
    fault = _option_fault(data)
    if fault:
        raise error(f"Cannot read {path}: {fault}.")
    return data


def parse_sets(items: Iterable[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` items → {field: value}, each VALUE read as YAML (``0.3``, ``null``, ``[0.5, 0.5, 0.5]``)
    and checked like a config file's."""
    values: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise TransferlabError(f"--set takes KEY=VALUE (e.g. --set head_dropout=0.3), got {item!r}")
        try:
            values[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise TransferlabError(f"--set {item!r}: the value is not valid YAML") from None
    fault = _option_fault(values)
    if fault:
        raise TransferlabError(f"--set: {fault}")
    return values


def _option_fault(values: dict[str, Any]) -> str:
    """'' when `values` are TrainConfig fields of the right types; else what is wrong with them (unknown
    names with their closest fields first, then up to five wrong types)."""
    unknown = unknown_options(values)
    if unknown:
        return f"unknown option(s) {unknown}"
    return "; ".join(_wrong_types(TrainConfig, values)[:5])


def unknown_options(names: Any) -> str:
    """'' when every name is a TrainConfig field; else the unknown ones, each with its closest fields."""
    known = [f.name for f in dataclasses.fields(TrainConfig)]
    unknown = sorted(set(names) - set(known))
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        parts.append(f"{name!r}" + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""))
    return ", ".join(parts)


def _wrong_types(cls: type, data: dict[str, Any]) -> list[str]:
    """'key: expected T, got V' for each value whose type its field's annotation does not allow (ints
    pass for floats, as YAML writes 1e-3 as a float but 1 as an int)."""
    import types
    import typing

    hints = typing.get_type_hints(cls)
    wrong = []
    for key, value in data.items():
        hint = hints.get(key)
        if hint is None:
            continue
        allowed = tuple(typing.get_origin(t) or t for t in (hint.__args__ if isinstance(hint, types.UnionType) else (hint,)))
        allowed = tuple(t for t in allowed if t is not Any)
        if not allowed or (float in allowed and isinstance(value, int) and not isinstance(value, bool)):
            continue
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            wrong.append(f"'{key}' must be {names}, got {value!r}")
    return wrong
