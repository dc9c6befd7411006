"""`transferlab doctor`: what is wrong with a dataset, found before a model learns it.

    result = run_doctor(TrainConfig(data="data/"), DoctorOptions(), out="runs/doctor")
    result.of_kind("label_issue")[:5]

Each check is one entry of ``CHECKS`` (a registry: kind -> Check); all of them read one ``DoctorData``:
the validated splits (train, val, test in one list), the frozen-backbone features of every image and
the image sizes. The features are those `train` extracts and caches (same backbone, preprocessing,
precision and seed: the same cache key), so on data a run has seen the doctor costs no forward pass;
otherwise it extracts them once, with a progress bar, and leaves them cached for `train`.

Findings, worst first within each kind; ``findings.csv`` holds all of them (path, kind, score,
partner / suggested label), ``doctor.json`` the same plus the settings and counts, which the run
report renders:

* unreadable: files the loader skipped (its own skip list and reasons);
* exact_duplicate: byte-identical files (``DataSplits.duplicate_groups``, as the load warnings);
* near_duplicate: pairs whose embeddings have cosine similarity >= ``similarity`` (``neighbours``:
  blockwise, O(N² D) time, no N x N memory); across splits they leak evaluation images into training;
* label_issue: confident learning on out-of-fold linear-probe probabilities (``label_issues``);
* class_imbalance: classes with under ``imbalance`` times the images of the largest;
* size_outlier: images whose area or aspect ratio is far from the rest (robust z-score of the logs).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from transferlab.config import TrainConfig
from transferlab.data.images import ImageError, image_size
from transferlab.data.sources import DataSplits, Sample
from transferlab.data.splits import SPLITS
from transferlab.errors import RunDirError, TransferlabError
from transferlab.logs import tracked
from transferlab.run_dir import RunDir

__all__ = ["CHECKS", "CSV_COLUMNS", "DOCTOR_FORMAT", "DoctorOptions", "DoctorResult", "Finding", "cached_by", "doctor_run",
           "is_run_dir", "load_doctor", "run_doctor"]

log = logging.getLogger("transferlab")

DOCTOR_FORMAT = "transferlab.doctor/1"
CSV_COLUMNS = ["kind", "path", "score", "partner", "suggested_label", "split", "label", "partner_split", "detail"]
JSON_NAME, CSV_NAME = "doctor.json", "findings.csv"
RUN_SUBDIR = "doctor"  # a run's doctor writes into RUN/doctor/
_SIZE_WORKERS = 4  # image headers are read on a few threads (file system latency, not CPU)


@dataclass(frozen=True)
class DoctorOptions:
    """The doctor's own thresholds (the backbone and data settings are a TrainConfig's)."""

    # cosine similarity of two images' embeddings from which they are near-duplicates. High, because the
    # pooled features of the default backbone do not separate a heavily re-encoded copy from a distinct
    # photo: on ants/bees (efficientnet_lite0, 288 px) copies resized to 0.6x as JPEG quality 70 scored
    # 0.72-0.90 against their originals, the most similar distinct pair 0.84 (median pair 0.32). So this
    # flags copies that are near-identical pixel for pixel; lower it to rank looser ones (README).
    similarity: float = 0.97
    folds: int = 5  # out-of-fold probe for label issues: at most this many stratified folds
    imbalance: float = 0.2  # a class with fewer than this fraction of the largest class's images
    outlier_z: float = 3.5  # robust z-score (Iglewicz & Hoaglin's cut-off) of log area or log aspect
    top: int = 20  # findings per kind shown in the terminal and the report; the CSV has all of them

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise TransferlabError(f"Invalid doctor option: {msg}")

        if not -1.0 <= self.similarity <= 1.0 or math.isnan(self.similarity):
            bad(f"--similarity is a cosine similarity in [-1, 1] (e.g. 0.97), got {self.similarity}")
        if self.folds < 2:
            bad(f"--folds must be at least 2 (the probe must not see the images it scores), got {self.folds}")
        if not 0.0 < self.imbalance <= 1.0:
            bad(f"--imbalance is a fraction of the largest class in (0, 1] (e.g. 0.2), got {self.imbalance}")
        if not self.outlier_z > 0:
            bad(f"--outlier-z must be > 0 (e.g. 3.5), got {self.outlier_z}")
        if self.top < 1:
            bad(f"--top must be at least 1, got {self.top}")


@dataclass
class Finding:
    """One problem: an image (or a class, for class_imbalance) and what is wrong with it."""

    kind: str  # a key of CHECKS
    path: str
    score: float  # how sure or how bad, higher first; its meaning per kind is CHECKS[kind].score
    split: str = ""
    label: str = ""
    partner: str = ""  # the other image of a duplicate pair
    partner_split: str = ""
    suggested_label: str = ""
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "score": round(float(self.score), 6)}


@dataclass
class DoctorData:
    """What every check reads: the images of all splits in one order, their features and sizes."""

    splits: DataSplits
    samples: list[Sample]
    split_of: list[str]
    features: np.ndarray  # [N, D], row i is samples[i]
    sizes: list[tuple[int, int] | None]  # upright (width, height); None when the header is unreadable now
    options: DoctorOptions
    seed: int = 0
    device: str = "cpu"

    @property
    def classes(self) -> list[str]:
        return self.splits.classes

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=np.int64)


@dataclass(frozen=True)
class Check:
    title: str
    score: str  # what the score means, shown beside the findings
    find: Callable[[DoctorData], list[Finding]]


def _unreadable(d: DoctorData) -> list[Finding]:
    return [Finding("unreadable", entry["path"], 1.0, detail=entry["reason"]) for entry in d.splits.skipped]


def _scope(split: str, partner_split: str) -> str:
    return f"within {split}" if split == partner_split else f"across {partner_split}/{split}: leakage"


def _pair_detail(split: str, partner_split: str, label: str, partner_label: str) -> str:
    differ = "" if label == partner_label else f"; labelled {partner_label!r} there"
    return _scope(split, partner_split) + differ


def _exact_duplicates(d: DoctorData) -> list[Finding]:
    found = []
    for members in d.splits.duplicate_groups():
        (first_split, first), *rest = members
        for split, sample in rest:
            found.append(Finding("exact_duplicate", str(sample.path), 1.0, split, d.classes[sample.label],
                                 partner=str(first.path), partner_split=first_split,
                                 detail=_pair_detail(split, first_split, d.classes[sample.label],
                                                     d.classes[first.label])))
    # pairs across splits first: they inflate the scores, copies within a split only over-weight
    return sorted(found, key=lambda f: f.split == f.partner_split)


def _near_duplicates(d: DoctorData) -> list[Finding]:
    from transferlab.evaluation.neighbours import similar_pairs

    digests = d.splits.digests
    found = []
    for i, j, similarity in similar_pairs(d.features, d.options.similarity, device=d.device):
        a, b = d.samples[i], d.samples[j]
        if digests and digests.get(a.path) is not None and digests.get(a.path) == digests.get(b.path):
            continue  # byte-identical: an exact duplicate, listed as such
        # j comes later in train, val, test order: the image in the split that evaluates is the one listed
        found.append(Finding("near_duplicate", str(b.path), similarity, d.split_of[j], d.classes[b.label],
                             partner=str(a.path), partner_split=d.split_of[i],
                             detail=_pair_detail(d.split_of[j], d.split_of[i], d.classes[b.label],
                                                 d.classes[a.label])))
    return found


def _label_issues(d: DoctorData) -> list[Finding]:
    from transferlab.evaluation.label_issues import find_label_issues
    from transferlab.evaluation.probe import out_of_fold_probabilities

    labels = d.labels
    probs = out_of_fold_probabilities(d.features, labels, len(d.classes), max_folds=d.options.folds, seed=d.seed)
    found = []
    for issue in find_label_issues(probs, labels):
        sample, label = d.samples[issue.index], d.classes[labels[issue.index]]
        suggested = d.classes[issue.suggested]
        found.append(Finding("label_issue", str(sample.path), 1.0 - issue.self_confidence, d.split_of[issue.index],
                             label, suggested_label=suggested,
                             detail=f"p({label})={issue.self_confidence:.3f}, p({suggested})="
                                    f"{issue.suggested_probability:.3f} (out-of-fold probe)"))
    return found


def _class_imbalance(d: DoctorData) -> list[Finding]:
    counts = Counter(s.label for s in d.samples)
    largest_label, largest = max(counts.items(), key=lambda kv: (kv[1], -kv[0]))
    found = []
    for label, name in enumerate(d.classes):
        n = counts.get(label, 0)
        if n < d.options.imbalance * largest:
            found.append(Finding("class_imbalance", "", 1.0 - n / largest, label=name,
                                 detail=f"{n} images vs {largest} of {d.classes[largest_label]!r} "
                                        f"(1:{largest / max(n, 1):.0f}); weight or add images"))
    return sorted(found, key=lambda f: -f.score)


# A median absolute deviation below this (natural-log units) counts as this much: in a dataset of (nearly)
# one size any other size would be an extreme z-score. On ants/bees (most images 500x375, MAD 0.12 of log
# area and of log aspect) a floor of 0.1 flagged 37 of 398 images, 0.2 flagged 6 (its tiny thumbnails
# and multi-megapixel photos), so a flagged image is 2.8x off the median area or aspect at z 3.5.
_MIN_LOG_MAD = 0.2


def _robust_z(values: np.ndarray) -> np.ndarray:
    """Iglewicz & Hoaglin's modified z-score: 0.6745 (x - median) / MAD."""
    median = np.median(values)
    mad = max(float(np.median(np.abs(values - median))), _MIN_LOG_MAD)
    return 0.6745 * (values - median) / mad


def _size_outliers(d: DoctorData) -> list[Finding]:
    known = [i for i, s in enumerate(d.sizes) if s is not None]
    if len(known) < 3:
        return []
    w = np.array([d.sizes[i][0] for i in known], dtype=np.float64)
    h = np.array([d.sizes[i][1] for i in known], dtype=np.float64)
    z_area, z_aspect = _robust_z(np.log(w * h)), _robust_z(np.log(w / h))
    typical = f"{int(np.median(w))}x{int(np.median(h))}"
    found = []
    for k, i in enumerate(known):
        score = max(abs(z_area[k]), abs(z_aspect[k]))
        if score > d.options.outlier_z:
            what = " and ".join(name for name, z in (("size", z_area[k]), ("aspect ratio", z_aspect[k]))
                                if abs(z) > d.options.outlier_z)
            sample = d.samples[i]
            found.append(Finding("size_outlier", str(sample.path), float(score), d.split_of[i],
                                 d.classes[sample.label],
                                 detail=f"{int(w[k])}x{int(h[k])} (typical {typical}): unusual {what}"))
    return sorted(found, key=lambda f: -f.score)


CHECKS: dict[str, Check] = {
    "unreadable": Check("Unreadable files", "1: skipped by the loader", _unreadable),
    "exact_duplicate": Check("Exact duplicates", "1: byte-identical", _exact_duplicates),
    "near_duplicate": Check("Near-duplicates", "cosine similarity of the embeddings", _near_duplicates),
    "label_issue": Check("Label-issue candidates", "1 - out-of-fold probability of its own label", _label_issues),
    "class_imbalance": Check("Class imbalance", "1 - images / images of the largest class", _class_imbalance),
    "size_outlier": Check("Size and aspect outliers", "robust z-score of log area or log aspect", _size_outliers),
}
"""The checks, in the order they are shown."""


@dataclass
class DoctorResult:
    """Findings (worst first within each kind, kinds in CHECKS order), counts, settings, where files went."""

    data: str
    root: str  # paths are shown relative to it
    backbone: str
    classes: list[str]
    counts: dict[str, dict[str, int]]  # split -> class -> images
    findings: list[Finding]
    options: DoctorOptions
    features_cached: bool
    seconds: dict[str, float]
    skipped_count: int = 0  # every file the loader skipped (the unreadable findings list the first ones)
    out_dir: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)

    def of_kind(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]

    def summary(self) -> dict[str, int]:
        """Findings per kind, every kind present."""
        counts = Counter(f.kind for f in self.findings)
        return {kind: counts.get(kind, 0) for kind in CHECKS}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": DOCTOR_FORMAT, "data": self.data, "root": self.root, "backbone": self.backbone,
            "classes": list(self.classes), "counts": self.counts, "options": dataclasses.asdict(self.options),
            "summary": self.summary(), "skipped_count": self.skipped_count,
            "features_cached": self.features_cached, "seconds": self.seconds,
            "checks": {kind: {"title": c.title, "score": c.score} for kind, c in CHECKS.items()},
            "out_dir": None if self.out_dir is None else str(self.out_dir),
            "findings": [f.to_dict() for f in self.findings],
        }


def load_doctor(path: Path) -> dict[str, Any]:
    """A saved doctor.json (the ``to_dict()`` form)."""
    from transferlab.io import read_json

    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != DOCTOR_FORMAT:
        raise TransferlabError(f"{path} is not a transferlab doctor result ({DOCTOR_FORMAT}); re-run `transferlab doctor`.")
    return data


def is_run_dir(path: str | Path) -> bool:
    """A training run's directory (its config.yaml and model.json), as opposed to a dataset."""
    rd = RunDir(path)
    return rd.path.is_dir() and rd.is_run and rd.model_meta_path.is_file()


def default_out_dir() -> Path:
    return Path("runs") / f"doctor-{datetime.now():%Y%m%d-%H%M%S}"


def cached_by(cfg: TrainConfig) -> bool:
    """Whether a run with `cfg` left its frozen features in the disk cache (a run that trains no head on
    them, or keeps them in memory, did not)."""
    return cfg.feature_cache == "disk" and cfg.strategy in ("two-stage", "head-only") and cfg.epochs_frozen > 0


def doctor_run(run_dir: str | Path, options: DoctorOptions | None = None, *, progress: bool = True,
               only_if_cached: bool = False, out: str | Path | None = None) -> DoctorResult:
    """The doctor of a run's data with the run's own backbone and settings (its cached features),
    written into `out` (default RUN/doctor/). `only_if_cached` (the report's): refuse rather than make a
    forward pass over the data when the run did not cache its features."""
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise RunDirError(f"'{run_dir}' is not a run directory (no config.yaml and model.json).")
    cfg = RunDir(run_dir).config()
    if only_if_cached and not cached_by(cfg):
        raise TransferlabError(f"this run did not cache frozen features (strategy {cfg.strategy}, feature cache "
                               f"{cfg.feature_cache}); `transferlab doctor {run_dir}` runs it with one forward pass")
    cfg.progress = progress
    return run_doctor(cfg, options or DoctorOptions(), out=out if out is not None else run_dir / RUN_SUBDIR)


def run_doctor(cfg: TrainConfig, options: DoctorOptions, *, out: str | Path | None = None) -> DoctorResult:
    """Read and check `cfg.data` as `train` would, get every image's frozen features (cache or one pass),
    run CHECKS; write OUT/findings.csv and OUT/doctor.json (default runs/doctor-<time>)."""
    from transferlab import _runtime
    from transferlab.data.multilabel import refuse_multilabel
    from transferlab.data.sources import load_splits, require_data
    from transferlab.io import ensure_writable_dir
    from transferlab.models.registry import resolve_backbone
    from transferlab.training.features import resolve_sizes

    options.validate()
    # the plain view alone: augmented views are for training the head, not for describing the data
    cfg = dataclasses.replace(cfg, feature_views=0, preprocess=dict(cfg.preprocess), extra=dict(cfg.extra))
    cfg.validate()
    if cfg.world_size > 1:
        raise TransferlabError("doctor runs in one process: leave --devices and --num-nodes at 1.")
    require_data(cfg.data, or_also="a run directory")
    refuse_multilabel(cfg.data, "doctor")
    _runtime.setup_torch()
    start = time.perf_counter()
    # what `train` builds, so that the features share its cache entries
    pretrained = cfg.pretrained and cfg.strategy != "scratch"
    spec = resolve_backbone(cfg.backbone, pretrained=pretrained, img_size=cfg.img_size)  # offline: fails here
    if cfg.preprocess:
        spec = dataclasses.replace(spec, preprocessing=dataclasses.replace(spec.preprocessing, **cfg.preprocess))
    spec, train_pre = resolve_sizes(cfg, spec)
    out_dir = ensure_writable_dir(Path(out) if out is not None else default_out_dir())
    if cfg.num_workers is None:
        cfg.num_workers = _runtime.default_num_workers()
    accelerator = _runtime.resolve_accelerator(cfg.device)
    autocast = _runtime.autocast_dtype(_runtime.resolve_precision(cfg.precision, accelerator, training=False))

    splits = load_splits(cfg.data, val_split=cfg.val_split, seed=cfg.seed, progress=cfg.progress)
    splits.drop_unreadable()  # as `train` does before its feature pass: the same samples, the same cache keys
    samples = [s for split in SPLITS for s in getattr(splits, split)]
    split_of = [split for split in SPLITS for _ in getattr(splits, split)]
    seconds = {"data": time.perf_counter() - start}

    t = time.perf_counter()
    features, cached = _frozen_features(cfg, spec, train_pre, splits, accelerator, autocast)
    seconds["features"] = time.perf_counter() - t
    t = time.perf_counter()
    sizes = _image_sizes([s.path for s in samples], cfg.progress)
    seconds["image_sizes"] = time.perf_counter() - t

    d = DoctorData(splits=splits, samples=samples, split_of=split_of, features=features, sizes=sizes,
                   options=options, seed=cfg.seed, device=accelerator)
    findings: list[Finding] = []
    for kind, check in CHECKS.items():
        t = time.perf_counter()
        findings += check.find(d)
        seconds[kind] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - start
    root = Path(str(cfg.data)).expanduser()
    result = DoctorResult(
        data=str(cfg.data), root=str(root if root.is_dir() else root.parent), backbone=spec.name,
        classes=list(splits.classes), counts=splits.counts(), findings=findings, options=options,
        features_cached=cached, seconds={k: round(v, 3) for k, v in seconds.items()},
        skipped_count=splits.skipped_count, out_dir=out_dir,
    )
    _write(result, out_dir)
    log.info("doctor: %s in %.1fs (features %s) -> %s", ", ".join(f"{n} {k}" for k, n in result.summary().items()),
             seconds["total"], "from the cache" if cached else "extracted", out_dir)
    return result


def _frozen_features(cfg: TrainConfig, spec, train_pre, splits: DataSplits, accelerator: str,
                     autocast) -> tuple[np.ndarray, bool]:
    """[N, D] features of train, val and test in that order, through `train`'s own feature pass (so its
    cache entries); returns (features, all from the cache)."""
    import lightning as L
    import torch

    from transferlab import _runtime
    from transferlab.data.transforms import eval_transform
    from transferlab.models.heads import HeadConfig, build_classifier
    from transferlab.training import distributed
    from transferlab.training.feature_cache import cached_features, transform_tag, usable_cache_dir
    from transferlab.training.features import frozen_features

    L.seed_everything(cfg.seed, workers=True, verbose=False)  # as train: a random-init backbone is the same one
    model = build_classifier(spec, len(splits.classes), HeadConfig(kind=cfg.head, hidden=cfg.head_hidden,
                                                                   dropout=cfg.head_dropout))
    (train_x, _, val_x, _), n_extracted = frozen_features(model, splits, cfg, spec, train_pre,
                                                    distributed.Ranks(device=accelerator), autocast)
    parts, cached = [train_x, val_x], n_extracted == 0
    if splits.test:  # train never extracts the test split; its features are cached here for the next doctor
        pre = spec.preprocessing
        test_x, hit = cached_features(
            model.to(accelerator), splits.test, eval_transform(pre), transform_tag(pre, autocast),
            cache_dir=usable_cache_dir(cfg.cache_dir) if cfg.feature_cache == "disk" else None,
            batch_size=max(cfg.batch_size, 64), device=accelerator, autocast_dtype=autocast,
            num_workers=cfg.num_workers, decode_threads=_runtime.decode_threads())
        model.to("cpu")
        parts.append(test_x)
        cached = cached and hit
    return torch.cat(parts).float().numpy(), cached


def _image_sizes(paths: Sequence[Path], progress: bool) -> list[tuple[int, int] | None]:
    def size(path: Path) -> tuple[int, int] | None:
        try:
            return image_size(path)
        except (ImageError, OSError):
            return None

    workers = max(1, min(_SIZE_WORKERS, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(size, paths)
        results = tracked(results, progress, "Reading image sizes", len(paths))
        return list(results)


def _write(result: DoctorResult, out_dir: Path) -> None:
    from transferlab.io import atomic_write_json, atomic_write_text

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(f.to_dict() for f in result.findings)
    result.files = {"csv": out_dir / CSV_NAME, "json": out_dir / JSON_NAME}
    atomic_write_text(result.files["csv"], buf.getvalue())
    atomic_write_json(result.files["json"], result.to_dict())
