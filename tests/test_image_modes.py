"""Images are read as a viewer shows them (issue 16 items 4, 5, 7): the EXIF orientation, every
Pillow mode with real value ranges converted to the right RGB or refused in one line, and
Pillow's decompression-bomb limit said in words, without its raw warning."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from PIL import Image, ImageCms

from hae_cli.errors import InputError
from hae_cli.model.image_file import largest_image_pixels, load_image

W, H = 32, 24
RAMP = np.tile(np.linspace(0, 1, W), (H, 1))  # 0 at the left edge, 1 at the right


def _rgb_ramp() -> np.ndarray:
    """A colour image with every channel at its own range: red left to right, green top to
    bottom, blue constant."""
    rgb = np.zeros((H, W, 3))
    rgb[..., 0] = RAMP
    rgb[..., 1] = np.linspace(0, 1, H)[:, None]
    rgb[..., 2] = 0.6
    return np.rint(rgb * 255).astype(np.uint8)


def _grey(values: np.ndarray) -> np.ndarray:
    return np.repeat(np.rint(values)[..., None], 3, axis=-1)


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None] / 255.0
    return rgb * a + 255 * (1 - a)


def _lab(rgb: np.ndarray) -> tuple[Image.Image, np.ndarray]:
    """The colours in 8-bit L*a*b*, and what a colour-managed viewer shows of them (8-bit a*
    and b* cannot hold every sRGB green, so not quite `rgb`)."""
    srgb, lab = ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB")
    image = ImageCms.applyTransform(Image.fromarray(rgb), ImageCms.buildTransform(srgb, lab, "RGB", "LAB"))
    shown = ImageCms.applyTransform(image, ImageCms.buildTransform(lab, srgb, "LAB", "RGB"))
    return image, np.asarray(shown, dtype=np.float64)


def _palette(alpha: bool):
    index = (RAMP * 3).astype(np.uint8).clip(0, 3)
    colours = np.array([[255, 0, 0], [0, 160, 0], [0, 0, 255], [250, 250, 40]], dtype=np.uint8)
    image = Image.fromarray(index)
    image.putpalette(colours.ravel().tolist())
    expected = colours[index].astype(np.float64)
    if alpha:
        a = np.rint(np.linspace(0, 255, H)[:, None] * np.ones((1, W))).astype(np.uint8)
        image = Image.merge("PA", (image, Image.fromarray(a)))
        expected = _over_white(expected, a.astype(np.float64))
    return image, expected


def _cases() -> dict:
    """mode -> (image in that mode with real values, the RGB a viewer shows, tolerance)."""
    rgb = _rgb_ramp()
    alpha = np.rint(np.linspace(255, 0, H)[:, None] * np.ones((1, W))).astype(np.uint8)
    grey8 = np.rint(RAMP * 255).astype(np.uint8)
    rgba = np.dstack([rgb, alpha])
    cases = {
        "1": (Image.fromarray(RAMP > 0.5), _grey((RAMP > 0.5) * 255.0), 0),
        "L": (Image.fromarray(grey8), _grey(grey8), 0),
        "LA": (Image.merge("LA", (Image.fromarray(grey8), Image.fromarray(alpha))), _over_white(_grey(grey8), alpha), 1),
        "La": (Image.merge("LA", (Image.fromarray(grey8), Image.fromarray(alpha))).convert("La"), _over_white(_grey(grey8), alpha), 3),
        "P": (*_palette(alpha=False), 0),
        "PA": (*_palette(alpha=True), 1),
        "RGB": (Image.fromarray(rgb), rgb, 0),
        "RGBA": (Image.fromarray(rgba), _over_white(rgb, alpha), 1),
        "RGBa": (Image.fromarray(rgba).convert("RGBa"), _over_white(rgb, alpha), 3),
        "RGBX": (Image.fromarray(rgb).convert("RGBX"), rgb, 0),
        "CMYK": (Image.fromarray(rgb).convert("CMYK"), rgb, 0),
        "YCbCr": (Image.fromarray(rgb).convert("YCbCr"), rgb, 4),
        "LAB": (*_lab(rgb), 2),
        "HSV": (Image.fromarray(rgb).convert("HSV"), rgb, 8),
        "F": (Image.fromarray(RAMP.astype(np.float32)), _grey(RAMP * 255), 1),
        "I": (Image.fromarray(np.rint(RAMP * 65535).astype(np.int32)), _grey(RAMP * 255), 1),
    }
    wide = np.rint(RAMP * 65535).astype(np.uint16)
    for mode, dtype in (("I;16", "<u2"), ("I;16L", "<u2"), ("I;16B", ">u2"), ("I;16N", "=u2")):
        cases[mode] = (Image.frombytes(mode, (W, H), wide.astype(dtype).tobytes()), _grey(RAMP * 255), 1)
    return cases


CASES = _cases()


def test_every_pillow_mode_has_a_case():
    """A mode Pillow adds later must be handled (and listed here) before it can pass."""
    assert set(Image.MODES) <= set(CASES), sorted(set(Image.MODES) - set(CASES))


@pytest.mark.parametrize("mode", sorted(CASES))
def test_each_mode_with_real_values_is_read_as_a_viewer_shows_it(mode):
    image, expected, tolerance = CASES[mode]
    assert image.mode == mode
    loaded = load_image(image)
    assert loaded.mode == "RGB" and loaded.size == (W, H)
    error = np.abs(np.asarray(loaded, dtype=np.float64) - expected)
    assert error.max() <= tolerance, (mode, error.max(), np.unravel_index(error.argmax(), error.shape))


@pytest.mark.parametrize("mode, fmt", [("I;16", "PNG"), ("I;16", "TIFF"), ("I", "TIFF"), ("F", "TIFF"), ("LAB", "TIFF"),
                                       ("CMYK", "JPEG"), ("CMYK", "TIFF"), ("LA", "PNG"), ("P", "PNG"), ("1", "PNG")])
def test_modes_read_back_from_files(tmp_path, mode, fmt):
    image, expected, tolerance = CASES[mode]
    path = tmp_path / f"{mode.replace(';', '_')}.{fmt.lower()}"
    image.save(path, fmt, **({"quality": 100} if fmt == "JPEG" else {}))
    loaded = np.asarray(load_image(path), dtype=np.float64)
    assert np.abs(loaded - expected).max() <= tolerance + (12 if fmt == "JPEG" else 0)


@pytest.mark.parametrize("white, dtype", [(255, np.int32), (65535, np.int32), (2**31 - 1, np.int32)])
def test_32_bit_integer_images_in_each_range(white, dtype):
    """An `I` image holding 8-bit samples (as Pillow's own L -> I gives), 16-bit ones (a
    16-bit file read the old way) or full 32-bit ones is read at its own scale, not all black
    or all white."""
    image = Image.fromarray(np.rint(RAMP * white).astype(dtype))
    loaded = np.asarray(load_image(image), dtype=np.float64)
    assert np.abs(loaded - _grey(RAMP * 255)).max() <= 1


@pytest.mark.parametrize("image, fragment", [
    (Image.fromarray(np.full((4, 4), -5, dtype=np.int32)), "negative 32-bit samples"),
    (Image.fromarray(np.full((4, 4), 300.0, dtype=np.float32)), "float samples outside"),
    (Image.fromarray(np.full((4, 4), np.nan, dtype=np.float32)), "float samples outside"),
    (Image.fromarray(np.full((4, 4), -0.5, dtype=np.float32)), "float samples outside"),
])
def test_samples_that_have_no_right_rgb_are_refused_in_one_line(image, fragment):
    with pytest.raises(InputError, match=fragment) as info:
        load_image(image)
    assert "\n" not in str(info.value)


def test_a_refused_mode_through_the_cli_is_one_line(tmp_path):
    from cli_runner import hae_in_process
    from hae_process import assert_one_line_error

    path = tmp_path / "signed.tif"
    Image.fromarray(np.full((8, 8), -7, dtype=np.int32)).save(path)
    assert_one_line_error(hae_in_process("ask", path, "what color is the shape?"), "negative 32-bit samples", "signed.tif")


# ----------------------------------------------------------------------------- EXIF orientation


def _exif_jpeg(pixels: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    pixels.save(out, "JPEG", quality=100, exif=exif.tobytes())
    return out.getvalue()


# What a file stores so that a viewer, turning it by `orientation`, shows `upright`.
STORED_FOR = {
    1: lambda im: im,
    2: lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    3: lambda im: im.transpose(Image.Transpose.ROTATE_180),
    4: lambda im: im.transpose(Image.Transpose.FLIP_TOP_BOTTOM),
    5: lambda im: im.transpose(Image.Transpose.TRANSPOSE),
    6: lambda im: im.transpose(Image.Transpose.ROTATE_90),
    7: lambda im: im.transpose(Image.Transpose.TRANSVERSE),
    8: lambda im: im.transpose(Image.Transpose.ROTATE_270),
}


def _upright() -> Image.Image:
    """Landscape, a different colour in each quadrant, so any turn or flip shows."""
    image = Image.new("RGB", (64, 32))
    for (x, y), colour in {(0, 0): (220, 20, 20), (32, 0): (20, 200, 20), (0, 16): (20, 20, 220),
                           (32, 16): (230, 230, 30)}.items():
        image.paste(colour, (x, y, x + 32, y + 16))
    return image


@pytest.mark.parametrize("orientation", sorted(STORED_FOR))
def test_exif_orientation_is_applied(tmp_path, orientation):
    upright = _upright()
    path = tmp_path / f"turned_{orientation}.jpg"
    path.write_bytes(_exif_jpeg(STORED_FOR[orientation](upright), orientation))
    loaded = load_image(path)
    assert loaded.size == upright.size
    for x, y in ((8, 8), (56, 8), (8, 24), (56, 24)):
        assert all(abs(a - b) <= 12 for a, b in zip(loaded.getpixel((x, y)), upright.getpixel((x, y)))), (x, y)


def test_exif_orientation_reaches_the_model(tmp_path, tiny_checkpoint):
    """Through `hae ask`: a landscape JPEG that EXIF turns to portrait is cut into crops as a
    portrait (2 rows of crops, so 37 separators, not 25)."""
    from cli_runner import hae_in_process
    import json

    stored = Image.new("RGB", (672, 336), (200, 40, 40))
    turned, portrait = tmp_path / "turned.jpg", tmp_path / "portrait.png"
    turned.write_bytes(_exif_jpeg(stored, 6))
    Image.new("RGB", (336, 672), (200, 40, 40)).save(portrait)
    counts = []
    for path in (turned, portrait):
        result = hae_in_process("ask", path, "what color?", "--model", tiny_checkpoint, "--num-crops", "2", "-n", "1", "--json")
        assert result.returncode == 0, result.stderr.decode()[-2000:]
        counts.append(json.loads(result.stdout)["prompt_tokens"])
    assert counts[0] == counts[1] and counts[0]["separator"] == 37


# ----------------------------------------------------------------------------- decompression bombs


def test_an_image_past_the_warning_limit_is_read_without_a_raw_warning(monkeypatch, tmp_path):
    path = tmp_path / "big.png"
    Image.fromarray(_rgb_ramp()).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 32 x 24 = 768 pixels: past the warning, under 2x
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_image(path)
    assert loaded.size == (W, H)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def _png_header_only(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_an_image_past_the_safe_limit_is_refused_saying_how_large_one_may_be(tmp_path):
    from cli_runner import hae_in_process
    from hae_process import assert_one_line_error

    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(20000, 20000))
    line = assert_one_line_error(hae_in_process("ask", path, "what color?"), "too large", "bomb.png", "400,000,000 pixels")
    assert f"up to {largest_image_pixels():,} pixels" in line and "DOS" not in line
