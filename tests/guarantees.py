"""Helpers shared by the test_guarantees_* files: the CLI run in-process, awkward image files."""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# The tiny-run options of conftest.TINY, as CLI flags.
TINY_FLAGS = ["--backbone", "test_efficientnet", "--no-pretrained", "--img-size", "32", "--epochs-frozen", "3",
              "--finetune", "full", "--epochs-finetune", "2", "--batch-size", "8", "--num-workers", "0", "--early-stop", "0", "--finetune-gate", "0",
              "--lr-head", "0.05", "--no-progress", "--no-report"]


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        """stdout + stderr with the console's line wrapping undone."""
        return " ".join((self.out + " " + self.err).split())


def cli(*args) -> CliResult:
    """`transferlab ARGS` in this process (so tests can monkeypatch it): exit code, stdout, stderr.
    The logger state the CLI sets up (handlers, propagation) is restored afterwards."""
    from transferlab import cli as cli_module

    logger = logging.getLogger("transferlab")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["transferlab", *map(str, args)]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli_module.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
        logger.handlers[:], logger.propagate = saved[0], saved[1]
        logger.setLevel(saved[2])
    return CliResult(code, out.getvalue(), err.getvalue())


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def metrics_without_timings(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if "seconds" not in k} for row in read_metrics(run_dir)]


# --- awkward files ------------------------------------------------------------------------------


def noise(size=(40, 40), colour=(200, 40, 40), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.array(colour)[None, None] + rng.normal(0, 30, (size[1], size[0], 3)), 0, 255).astype(np.uint8)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def truncated_jpeg(path: Path) -> Path:
    buffer = io.BytesIO()
    Image.fromarray(noise((128, 128))).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[:600])
    return path


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A valid tiny PNG whose header (with a correct CRC) claims width x height: a decompression bomb."""
    data = bytearray(png_bytes(Image.new("RGB", (4, 4))))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def sixteen_bit_png(path: Path) -> Path:
    Image.fromarray((np.arange(40 * 40, dtype=np.uint16).reshape(40, 40) * 40).astype(np.uint16)).save(path)
    return path


def cmyk_jpeg(path: Path) -> Path:
    Image.new("CMYK", (40, 40), (0, 200, 200, 0)).save(path, "JPEG")
    return path


def palette_png_with_transparency(path: Path) -> Path:
    image = Image.fromarray(noise()).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    image.info["transparency"] = 0
    image.save(path, transparency=0)
    return path


def animated_gif(path: Path) -> Path:
    frames = [Image.fromarray(noise(seed=i)).convert("P") for i in range(3)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    return path


def exif_rotated_jpeg(path: Path) -> Path:
    """Stored 40 wide x 20 high, EXIF orientation 6: upright it is 20 wide x 40 high."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(noise((40, 20))).save(path, "JPEG", exif=exif.tobytes())
    return path


def disk_feature_cache(tmp_path: Path):
    """A tiny random model's features of a tiny folder, written to a fresh disk cache: (the cache file,
    the features, a function asking the cache again -> (features, hit)) — for the corrupt-cache guarantees."""
    from conftest import make_image_folder

    from transferlab.data.sources import load_splits
    from transferlab.data.transforms import eval_transform
    from transferlab.models.heads import HeadConfig, build_classifier
    from transferlab.models.registry import resolve_backbone
    from transferlab.training import feature_cache

    data = make_image_folder(tmp_path / "data", per_class=(4, 2))
    samples = load_splits(data, progress=False).train
    spec = resolve_backbone("test_efficientnet", pretrained=False, img_size=32)
    model = build_classifier(spec, 2, HeadConfig()).eval()
    transform = eval_transform(spec.preprocessing)
    cache = tmp_path / "cache"

    def features():
        return feature_cache.cached_features(model, samples, transform, "eval:test", cache_dir=cache)

    fresh, hit = features()
    assert not hit
    (path,) = cache.glob("*.safetensors")
    return path, fresh, features
