"""Image files: decide what counts as a usable image and decode it to 8-bit RGB.

Real-world folders contain zero-byte files, truncated downloads, HTML saved as ``.jpg``,
16-bit scans, CMYK print files and decompression bombs. Everything that reads an image goes
through this module so that all of them are handled the same way: either an RGB image
comes out, or an :class:`ImageError` with a short human reason.
"""

from __future__ import annotations

import hashlib
import io
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from transferlab.data.storage import member_bytes

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS",
    "ImageError",
    "file_digest",
    "has_image_extension",
    "image_size",
    "load_image",
    "looks_like_image",
    "unsupported_format",
    "probe_image",
    "resized_short_side",
    "unreadable_reason",
]

MAX_PIXELS: int = 89_478_485
"""PIL's default decompression-bomb limit; larger images are rejected before decoding, and images that a
resize would make larger (a 1x200000 strip with its short side resized to 224) before resizing."""

PIXEL_LIMIT_REASONS: tuple[str, ...] = ("decompression bomb", "resize bomb")
"""How the reasons of images refused for their size begin (``serve`` answers them with 413)."""

# Image formats some installs of Pillow decode and others do not (AVIF: Pillow >= 11.3 wheels).
_OPTIONAL_FORMATS = (".avif",)
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
    | {ext for ext in _OPTIONAL_FORMATS if ext in Image.registered_extensions()}
)
"""Lower-case suffixes (with the dot) of files read as images; compare ``suffix.lower()``. What `serve`
decodes (any format Pillow opens) and what a folder contributes agree: AVIF is in where Pillow reads it."""
# Images in formats read nowhere here: a data folder lists them as skipped (with this reason) rather than
# passing over them in silence like a README or a .DS_Store.
UNSUPPORTED_IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".heic", ".heif", ".svg", ".svgz", ".jxl", ".jp2", *_OPTIONAL_FORMATS}) - IMAGE_EXTENSIONS


def unsupported_format(path: str | Path) -> str | None:
    """The skip reason for an image in a format no decoder here reads, else None."""
    suffix = Path(path).suffix.lower()
    if suffix not in UNSUPPORTED_IMAGE_EXTENSIONS:
        return None
    return f"unsupported image format {suffix} (no decoder for it here: convert it to JPEG or PNG)"

# What PIL's plugins raise on malformed files: each format reports damage its own way
# (truncated streams, bad structure, impossible sizes, failed decompression...).
_DECODE_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    LookupError,
    TypeError,
    ArithmeticError,
    RuntimeError,
    MemoryError,
    struct.error,
    zlib.error,
)

_DIGEST_CHUNK = 1 << 20
_WHITE = (255, 255, 255, 255)

# A truncated file must be reported, never silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageError(Exception):
    """A file that cannot be used as an image; ``reason`` is short and human-readable."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def has_image_extension(path: str | Path) -> bool:
    """Whether the file name ends in a known image suffix (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


class _PilBombCheck:
    """Switches PIL's own decompression-bomb check off while any of our opens is in flight.

    PIL's check is a process-wide global that warns above its limit and raises above twice
    the limit. We check ourselves (with a per-call limit and a clear reason), so the global
    is disabled meanwhile; a refcount under a lock keeps this right with concurrent threads.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._saved: int | None = None

    @contextmanager
    def disabled(self) -> Iterator[None]:
        with self._lock:
            if self._users == 0:
                self._saved = Image.MAX_IMAGE_PIXELS
                Image.MAX_IMAGE_PIXELS = None
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    Image.MAX_IMAGE_PIXELS = self._saved


_pil_bomb_check = _PilBombCheck()


@contextmanager
def _open_checked(path: Path, max_pixels: int) -> Iterator[Image.Image]:
    """Open the header only, rejecting empty files and oversized images before any decode."""
    source: Path | io.BytesIO = path
    try:
        size = path.stat().st_size
    except NotADirectoryError:  # a member of a WebDataset shard: shard.tar/KEY.jpg
        blob = _shard_member(path)
        source, size = io.BytesIO(blob), len(blob)
    except OSError as exc:
        raise ImageError(f"unreadable file: {exc.strerror or exc}") from exc
    if size == 0:
        raise ImageError("zero-byte file")
    with _pil_bomb_check.disabled():
        try:
            image = Image.open(source)
        except UnidentifiedImageError as exc:
            raise ImageError("not an image (unrecognised file format)") from exc
        except _DECODE_ERRORS as exc:
            raise ImageError(f"truncated or corrupt image: {exc}") from exc
        with image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(
                    f"decompression bomb: {width}x{height} pixels exceeds limit {max_pixels}"
                )
            _check_jpeg_holds_its_size(image, size)
            yield image


# JPEG start-of-frame markers of arithmetic coding (SOF9-11, SOF13-15), which may spend under a bit per block
_ARITHMETIC_SOF = tuple(bytes((0xFF, m)) for m in (0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))


def _check_jpeg_holds_its_size(image: Image.Image, file_size: int) -> None:
    """A Huffman-coded JPEG spends at least one bit on every 8x8 block of its first component (the code of
    its DC coefficient, in baseline and progressive files alike), so a file smaller than a bit per luma
    block cannot hold the image its header claims: it is truncated, or lies (a 48x48 stream under a
    9000x9000 header). libjpeg would only warn and fill the rest with grey, after seconds of work; here it
    is refused from the header, before any decode. Arithmetic-coded files (rare) are not judged."""
    if image.format not in ("JPEG", "MPO"):
        return
    width, height = image.size
    blocks = -(-width // 8) * -(-height // 8)
    if file_size * 8 >= blocks:
        return
    fp = image.fp
    where = fp.tell()  # the start of the first scan: everything before it is headers
    try:
        fp.seek(0)
        headers = fp.read(where)
    finally:
        fp.seek(where)
    if any(marker in headers for marker in _ARITHMETIC_SOF):
        return
    raise ImageError(f"truncated or corrupt image: {file_size} bytes cannot hold the {width}x{height} JPEG its "
                     f"header claims (at least {-(-blocks // 8)} bytes of image data)")


def resized_short_side(width: int, height: int, short: int, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """The size a resize of the short side to `short` gives (torchvision's ``Resize(int)`` and PIL's: the long
    side becomes ``int(short * long / short_old)``), checked before anything is resized: raises
    :class:`ImageError` ``resize bomb: …`` when it would exceed `max_pixels`. Every decode path resizes
    through here (``data.transforms`` for torch, ``export.preprocess`` for exported models), so the pixel
    limit holds for what the resize produces, not only for the file — a thin strip of a few hundred
    bytes cannot make gigabytes of pixels."""
    old_short, old_long = (width, height) if width <= height else (height, width)
    new_long = int(short * old_long / old_short)
    size = (short, new_long) if width <= height else (new_long, short)
    if size[0] * size[1] > max_pixels:
        raise ImageError(f"resize bomb: {width}x{height} pixels would be resized to {size[0]}x{size[1]} "
                         f"(over the limit of {max_pixels})")
    return size


def looks_like_image(path: str | Path) -> bool:
    """Whether the file's content is an image format we read (header only, nothing decoded).

    For files without an extension, which are judged by content rather than name; a damaged
    image counts as one, so that validation then reports why it cannot be used.
    """
    try:
        with _open_checked(Path(path), MAX_PIXELS):
            return True
    except ImageError as exc:
        return not exc.reason.startswith(("not an image", "zero-byte", "unreadable"))


def probe_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> None:
    """Decode the whole file once so bad images are found up front, not mid-training.

    Raises :class:`ImageError` for zero-byte, unreadable, non-image, oversized (checked from
    the header, before decoding) and truncated or corrupt files. A JPEG is decoded at libjpeg's
    1/8 scale: every byte of its compressed data is still read and decoded, only the inverse DCT
    is skipped, and nothing here keeps the pixels. Measured: 68-71 -> 25 ms for a 12-MP photo,
    1.4-1.5 -> 0.9-1.0 ms for a 500x338 one; a full decode and this one judged 350 truncated and
    byte-corrupted JPEGs alike.
    """
    with _open_checked(Path(path), max_pixels) as image:
        try:
            image.draft(None, (1, 1))  # JPEG (and MPO): the smallest scale; other formats: a no-op
            image.load()
        except _DECODE_ERRORS as exc:
            raise ImageError(f"truncated or corrupt image: {exc}") from exc


# EXIF orientations that turn the picture a quarter turn: its upright width and height swap
_QUARTER_TURNS = frozenset({5, 6, 7, 8})


def image_size(path: str | Path, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(width, height) of the image as shown upright, from its header alone (nothing is decoded).
    Raises :class:`ImageError` as `load_image` does for a file it cannot open."""
    with _open_checked(Path(path), max_pixels) as image:
        width, height = image.size
        try:
            turned = image.getexif().get(0x0112) in _QUARTER_TURNS  # 0x0112: the EXIF orientation tag
        except _DECODE_ERRORS:  # malformed EXIF: as `_upright`, ignored
            turned = False
    return (height, width) if turned else (width, height)


def load_image(path: str | Path, max_pixels: int = MAX_PIXELS, *, at_least: int | None = None) -> Image.Image:
    """Decode any supported image to 8-bit RGB, upright, with transparency on white.

    Animated images yield their first frame. Raises :class:`ImageError` if unusable.
    `at_least` is for pictures of an image, never for model inputs: a JPEG may then be decoded at a
    reduced DCT scale whose sides stay >= `at_least` (a 12-MP photo for a 160-px thumbnail: 1/8).
    """
    with _open_checked(Path(path), max_pixels) as image:
        try:
            if at_least is not None:
                image.draft(None, (at_least, at_least))
            image.load()
        except _DECODE_ERRORS as exc:
            raise ImageError(f"truncated or corrupt image: {exc}") from exc
        return as_rgb(image)


def as_rgb(image: Image.Image) -> Image.Image:
    """An image already in memory (a PIL image a user passes to the Python API) as `load_image` returns
    a decoded file: upright, 8-bit RGB, transparency on white."""
    upright = _upright(image)
    convert = _TO_RGB.get(upright.mode, _convert_rgb)
    try:
        return convert(upright)
    except ValueError as exc:
        raise ImageError(f"unsupported colour mode {upright.mode!r}: {exc}") from exc


def file_digest(path: str | Path) -> str:
    """SHA-1 of the file's bytes: finds byte-identical duplicates and keys caches. A file that cannot be
    read (deleted since it was validated, its permissions changed) is an :class:`ImageError`
    ``unreadable file: …``, as for a decode."""
    digest = hashlib.sha1(usedforsecurity=False)
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(_DIGEST_CHUNK):
                digest.update(chunk)
    except NotADirectoryError:  # a member of a WebDataset shard
        digest.update(_shard_member(Path(path)))
    except OSError as exc:
        raise ImageError(f"unreadable file: {exc.strerror or exc}") from exc
    return digest.hexdigest()


def unreadable_reason(path: str | Path) -> str | None:
    """Why the file cannot be read now (``unreadable file: …``: gone, no permission), or None. Opens the
    file and reads nothing (a shard member: its bytes), so it is cheap enough to recheck a whole dataset."""
    try:
        with open(path, "rb"):
            return None
    except NotADirectoryError:
        try:
            _shard_member(Path(path))
            return None
        except ImageError as exc:
            return exc.reason
    except OSError as exc:
        return f"unreadable file: {exc.strerror or exc}"


def _shard_member(path: Path) -> bytes:
    try:
        return member_bytes(path)
    except FileNotFoundError as exc:
        raise ImageError(f"unreadable file: {exc}") from exc


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation (phone photos); a detached copy either way.

    Malformed EXIF must not cost an otherwise good image (``probe_image`` accepted it), so
    it is ignored rather than raised.
    """
    try:
        return ImageOps.exif_transpose(image)
    except _DECODE_ERRORS:
        return image.copy()


# --- colour-mode conversions -------------------------------------------------------------


def _convert_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


def _identity(image: Image.Image) -> Image.Image:
    return image


def _composite_on_white(image: Image.Image) -> Image.Image:
    """Transparent pixels become white: black (PIL's default) would be a spurious cue."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE)
    return Image.alpha_composite(background, rgba).convert("RGB")


def _palette(image: Image.Image) -> Image.Image:
    if "transparency" in image.info:
        return _composite_on_white(image)
    return image.convert("RGB")


def _gray_array_to_rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(gray.astype(np.uint8)).convert("RGB")


def _sixteen_bit(image: Image.Image) -> Image.Image:
    """Scale 0..65535 to 0..255 (divide by 257); PIL's own convert clips, whitening the image."""
    values = np.asarray(image).astype(np.int64)
    return _gray_array_to_rgb(np.clip(values, 0, 65535) // 257)


def _float(image: Image.Image) -> Image.Image:
    """Float images in 0..1 are scaled to 0..255; anything else is clipped to 0..255."""
    values = np.nan_to_num(
        np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0
    )
    if values.size and values.min() >= 0.0 and values.max() <= 1.0:
        values = values * 255.0
    return _gray_array_to_rgb(np.clip(np.rint(values), 0, 255))


_TO_RGB: dict[str, Callable[[Image.Image], Image.Image]] = {
    "RGB": _identity,
    "RGBA": _composite_on_white,
    "RGBa": _composite_on_white,
    "LA": _composite_on_white,
    "PA": _composite_on_white,
    "P": _palette,
    "I": _sixteen_bit,
    "I;16": _sixteen_bit,
    "I;16L": _sixteen_bit,
    "I;16B": _sixteen_bit,
    "I;16N": _sixteen_bit,
    "F": _float,
}
"""Mode-specific conversions; every other mode (L, 1, CMYK, YCbCr...) uses ``convert("RGB")``."""
