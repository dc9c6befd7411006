"""Image validation and decoding: every awkward file either becomes RGB or a clear ImageError."""

from __future__ import annotations

import hashlib
import io
import struct
import threading
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from transferlab.data.images import (
    MAX_PIXELS,
    ImageError,
    file_digest,
    has_image_extension,
    load_image,
    probe_image,
)


def _noise(size: tuple[int, int] = (64, 48), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A real tiny PNG whose IHDR (with a valid CRC) claims ``width`` x ``height``."""
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (10, 20, 30)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    "name", ["a.jpg", "B.JPEG", "c.Png", "d.webp", "e.TIFF", "f.pgm"]
)
def test_image_extensions_are_case_insensitive(name):
    assert has_image_extension(name)


@pytest.mark.parametrize("name", ["notes.txt", "archive.zip", "jpg", "image.jpg.part"])
def test_non_image_extensions_are_rejected(name):
    assert not has_image_extension(name)


def test_zero_byte_file_is_rejected(tmp_path):
    path = tmp_path / "empty.jpg"
    path.touch()
    with pytest.raises(ImageError) as info:
        probe_image(path)
    assert info.value.reason == "zero-byte file"
    with pytest.raises(ImageError, match="zero-byte"):
        load_image(path)


@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("kept", [0.9, 0.99])
def test_jpeg_cut_near_its_end_is_rejected_by_the_reduced_scale_probe(tmp_path, kept, progressive):
    """The probe decodes JPEGs at 1/8 scale; the last rows of compressed data must still be checked."""
    full = io.BytesIO()
    _noise((512, 384)).save(full, "JPEG", quality=90, progressive=progressive)
    path = tmp_path / "cut.jpg"
    path.write_bytes(full.getvalue()[: int(len(full.getvalue()) * kept)])
    with pytest.raises(ImageError, match="truncated or corrupt"):
        probe_image(path)


def test_the_probe_decodes_jpegs_at_one_eighth_scale_and_other_formats_in_full(tmp_path, monkeypatch):
    from PIL import JpegImagePlugin, PngImagePlugin

    loaded = []
    for plugin in (JpegImagePlugin.JpegImageFile, PngImagePlugin.PngImageFile):
        real = plugin.load
        monkeypatch.setattr(plugin, "load", lambda self, real=real: loaded.append(self.size) or real(self))
    for suffix in ("jpg", "png"):
        _noise((512, 384)).save(tmp_path / f"a.{suffix}")
        probe_image(tmp_path / f"a.{suffix}")
    assert loaded[0] == (64, 48) and loaded[-1] == (512, 384)
    assert load_image(tmp_path / "a.jpg").size == (512, 384)  # training reads the file's own pixels


def test_pictures_may_decode_big_jpegs_at_a_reduced_scale_that_keeps_the_size_asked_for(tmp_path):
    _noise((1600, 1200)).save(tmp_path / "big.jpg")
    _noise((1600, 1200)).save(tmp_path / "big.png")
    assert load_image(tmp_path / "big.jpg", at_least=140).size == (200, 150)  # 1/8
    assert load_image(tmp_path / "big.jpg", at_least=160).size == (400, 300)  # 1/4: at 1/8 the short side is 150
    assert load_image(tmp_path / "big.jpg", at_least=700).size == (1600, 1200)
    assert load_image(tmp_path / "big.png", at_least=160).size == (1600, 1200)  # only JPEG has the scales
    assert load_image(tmp_path / "big.jpg").size == (1600, 1200)


def test_truncated_jpeg_is_rejected_even_though_its_header_is_fine(tmp_path):
    full = io.BytesIO()
    _noise((256, 256)).save(full, "JPEG", quality=95)
    path = tmp_path / "cut.jpg"
    path.write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    with Image.open(path) as header_only:
        assert header_only.size == (256, 256)
    with pytest.raises(ImageError) as info:
        probe_image(path)
    assert info.value.reason.startswith("truncated or corrupt image")
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_text_file_with_jpg_extension_is_not_an_image(tmp_path):
    path = tmp_path / "page.jpg"
    path.write_text("<html>404 not found</html>")
    with pytest.raises(ImageError) as info:
        probe_image(path)
    assert info.value.reason.startswith("not an image")


def test_missing_file_is_reported_as_unreadable(tmp_path):
    with pytest.raises(ImageError, match="unreadable file"):
        probe_image(tmp_path / "gone.png")


def test_decompression_bomb_is_rejected_from_the_header_without_decoding(
    tmp_path, monkeypatch
):
    path = _png_claiming(tmp_path / "bomb.png", 20000, 20000)
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self))
    limit_before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageError) as info:
            probe_image(path)
        with pytest.raises(ImageError):
            load_image(path)
    assert info.value.reason == (
        f"decompression bomb: 20000x20000 pixels exceeds limit {MAX_PIXELS}"
    )
    assert decoded == []
    assert limit_before == Image.MAX_IMAGE_PIXELS


def test_pixel_limit_is_ours_not_pils_global(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    _noise((64, 64)).save(path)
    monkeypatch.setattr(
        Image, "MAX_IMAGE_PIXELS", 100
    )  # PIL alone would raise at 64x64
    assert load_image(path).size == (64, 64)
    assert Image.MAX_IMAGE_PIXELS == 100
    with pytest.raises(
        ImageError, match="decompression bomb: 64x64 pixels exceeds limit 1000"
    ):
        load_image(path, max_pixels=1000)


def test_concurrent_probes_restore_pils_pixel_limit(tmp_path):
    paths = []
    for i in range(16):
        paths.append(tmp_path / f"{i}.png")
        _noise((32, 32), seed=i).save(paths[-1])
    limit_before = Image.MAX_IMAGE_PIXELS
    threads = [
        threading.Thread(target=lambda: [probe_image(p) for p in paths])
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert limit_before == Image.MAX_IMAGE_PIXELS


def test_one_by_one_image_is_valid(tmp_path):
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (1, 2, 3)).save(path)
    probe_image(path)
    image = load_image(path)
    assert image.size == (1, 1)
    assert image.getpixel((0, 0)) == (1, 2, 3)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 32768], [65535, 257 * 200]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    image = load_image(path)
    assert image.mode == "RGB"
    pixels = np.asarray(image)
    assert (
        abs(int(pixels[0, 1, 0]) - 127) <= 1
    )  # mid-grey stays mid-grey (clipping gives 255)
    assert pixels[0, 0].tolist() == [0, 0, 0]
    assert pixels[1, 0].tolist() == [255, 255, 255]
    assert pixels[1, 1].tolist() == [200, 200, 200]


def test_float_tiff_in_unit_range_is_scaled_to_8_bit(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(np.full((3, 3), 0.5, dtype=np.float32)).save(path)
    assert abs(int(np.asarray(load_image(path))[1, 1, 0]) - 128) <= 1


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = tmp_path / "print.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=100)
    image = load_image(path)
    assert image.mode == "RGB"
    red, green, blue = image.getpixel((8, 8))
    assert red > 230
    assert green < 25
    assert blue < 25


def test_palette_png_transparency_is_composited_on_white(tmp_path):
    image = Image.new("P", (4, 1), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    image.putpixel((3, 0), 1)
    path = tmp_path / "palette.png"
    image.save(path, transparency=0)
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == (255, 255, 255)  # transparent black -> white
    assert loaded.getpixel((3, 0)) == (255, 0, 0)


def test_rgba_is_composited_on_white_by_alpha(tmp_path):
    array = np.zeros((1, 3, 4), dtype=np.uint8)
    array[0, :, 0] = 255  # red
    array[0, :, 3] = [0, 255, 128]
    path = tmp_path / "alpha.png"
    Image.fromarray(array).save(path)
    pixels = np.asarray(load_image(path)).astype(int)
    assert pixels[0, 0].tolist() == [255, 255, 255]
    assert pixels[0, 1].tolist() == [255, 0, 0]
    assert all(abs(v - 127) <= 2 for v in pixels[0, 2, 1:])


def test_grayscale_with_alpha_is_composited_on_white(tmp_path):
    path = tmp_path / "la.png"
    Image.new("LA", (2, 2), (0, 0)).save(path)
    assert load_image(path).getpixel((0, 0)) == (255, 255, 255)


def test_grayscale_becomes_three_equal_channels(tmp_path):
    path = tmp_path / "gray.png"
    Image.new("L", (5, 5), 77).save(path)
    image = load_image(path)
    assert image.mode == "RGB"
    assert image.getpixel((2, 2)) == (77, 77, 77)


def test_bilevel_image_becomes_black_and_white_rgb(tmp_path):
    path = tmp_path / "bits.bmp"
    image = Image.new("1", (2, 1), 0)
    image.putpixel((1, 0), 1)
    image.save(path)
    loaded = load_image(path)
    assert loaded.getpixel((0, 0)) == (0, 0, 0)
    assert loaded.getpixel((1, 0)) == (255, 255, 255)


def test_animated_gif_yields_its_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (8, 8), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as original:
        assert original.n_frames == 2
    image = load_image(path)
    assert image.mode == "RGB"
    assert image.getpixel((4, 4)) == (255, 0, 0)


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    _noise((60, 20)).save(path, exif=exif)
    with Image.open(path) as stored:
        assert stored.size == (60, 20)
    assert load_image(path).size == (20, 60)


def test_malformed_exif_does_not_reject_a_good_image(tmp_path, monkeypatch):
    path = tmp_path / "odd_exif.jpg"
    _noise((30, 20)).save(path)

    def broken_exif(*args, **kwargs):
        raise SyntaxError("not a TIFF file")

    monkeypatch.setattr(ImageOps, "exif_transpose", broken_exif)
    assert load_image(path).size == (30, 20)


def test_file_digest_is_sha1_of_content(tmp_path):
    first, second, other = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    payload = b"\x89PNG" + bytes(range(256)) * 5000
    first.write_bytes(payload)
    second.write_bytes(payload)
    other.write_bytes(payload + b"!")
    assert file_digest(first) == hashlib.sha1(payload).hexdigest()
    assert file_digest(first) == file_digest(second)
    assert file_digest(first) != file_digest(other)
