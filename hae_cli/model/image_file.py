"""An image file in, 8-bit RGB out, as a viewer shows it: the one image loader, whatever model
reads the pixels next."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from hae_cli.checks import as_url, kind_of, looks_like_url, path_status
from hae_cli.errors import InputError

_WHITE = (255, 255, 255)
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_INT32_MAX = 2**31 - 1


def largest_image_pixels() -> int:
    """Pillow refuses to decode more pixels than this (twice its warning limit): the most an
    image given to hae may have."""
    return 2 * Image.MAX_IMAGE_PIXELS


# --------------------------------------------------------------------------- loading


def load_image(source: str | Path | Image.Image) -> Image.Image:
    """Open an image fully decoded as 8-bit RGB, as a viewer shows it, or raise `InputError`
    naming the file.

    Decoding is forced here (`.load()`) so a truncated or corrupt file fails at the edge with
    its name, not deep inside preprocessing. The EXIF orientation is applied. Transparency is
    composited on white, the colour the HD transform pads with, so a transparent border and the
    padding look the same. Every Pillow mode is scaled to 8 bits by its own range
    (`_samples_to_8bit`) or refused. Images up to `largest_image_pixels()` are read without
    Pillow's decompression-bomb warning; larger ones are refused.
    """
    if isinstance(source, Image.Image):
        name = image_name(source)
        with _decode_errors(name):
            return _to_rgb(source, name)
    path = Path(source)
    name = str(source)
    status = _image_file(path, name)
    with _decode_errors(name):
        if status.st_size == 0:
            raise InputError(f"image file is empty: {name}")
        with Image.open(path) as image:
            return _to_rgb(image, name)


def _image_file(path: Path, name: str):
    """The image's `os.stat`, or `InputError` saying why it is not a file hae can read: what is
    not there, a URL, stdin, a folder, a pipe or a device, or the operating system's refusal."""
    if name == "-":
        raise InputError("reading an image from stdin ('-') is not supported: save the image to a file and give "
                         "its path")
    status = path_status(path, "image")
    if status is None:
        if looks_like_url(name):
            raise InputError(f"hae reads image files, not URLs: {as_url(name)}; download it first "
                             f"(curl -o image.png '{as_url(name)}') and give the file")
        raise InputError(f"image not found: {name}")
    kind = kind_of(status)
    if kind == "folder":
        raise InputError(f"image path is a directory, not a file: {name}")
    if kind != "file":
        raise InputError(f"image {name} is a {kind}, not a file: hae reads an image file twice (checked before "
                         "the model loads, then read), so save it to a file first")
    return status


def image_name(source) -> str:
    """What messages call an image: its path, or a PIL image's file name."""
    if isinstance(source, Image.Image):
        return getattr(source, "filename", "") or "<in-memory image>"
    return str(source)


def check_aspect_ratio(image: Image.Image, name: str, most: int, why: str) -> None:
    """Refuse a strip more than `most` times longer than wide, saying `why` the model cannot take it."""
    long, short = max(image.size), min(image.size)
    if long > most * short:
        raise InputError(f"image is {image.width}x{image.height} pixels ({long / short:,.0f}:1): {name}; {why}; "
                         f"crop it, or pad it to at most {most}:1")


def _too_large(name: str, error: Exception) -> InputError:
    counted = re.search(r"\((\d+) pixels\)", str(error))
    size = f"{int(counted.group(1)):,} pixels; " if counted else ""
    limit = largest_image_pixels()
    side = math.isqrt(limit)
    return InputError(
        f"image is too large to decode safely: {name} ({size}hae reads images of up to {limit:,} pixels, "
        f"e.g. {side:,} x {side:,}; shrink it first)"
    )


@contextmanager
def _decode_errors(name: str) -> Iterator[None]:
    """Turn Pillow's many failure types into one-line `InputError`s naming the file."""
    try:
        with warnings.catch_warnings():
            # Between Pillow's warning limit and twice it an image is read, without a raw warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError(f"not an image file (or an unsupported format): {name}") from None
    except Image.DecompressionBombError as e:
        raise _too_large(name, e) from None
    except PermissionError:
        raise InputError(f"cannot read image (permission denied): {name}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"image is truncated or corrupt: {name} ({detail})") from None


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    """Decode the one picture, turn it as its EXIF orientation says, and convert any Pillow mode
    to 8-bit RGB. An animation or a file of pages is refused (which frame the user means is not
    for hae to guess); a camera's MPO JPEG is its first frame, the photo (the others are previews)."""
    frames = getattr(image, "n_frames", 1)
    if frames > 1 and image.format != "MPO":
        raise InputError(f"image has {frames} frames (an animation, or pages): {name}; hae reads one picture: "
                         "save the one frame you mean as its own file")
    if frames > 1:
        image.seek(0)
    image.load()
    if image.width == 0 or image.height == 0:
        raise InputError(f"image has zero size ({image.width}x{image.height}): {name}")
    image = ImageOps.exif_transpose(image)
    image = _samples_to_8bit(image, name)
    if image.mode == "La":  # premultiplied alpha: Pillow converts it only to LA
        image = image.convert("LA")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # 1, L, P, RGB, RGBX, CMYK, YCbCr, LAB, HSV: Pillow's own conversions


def _samples_to_8bit(image: Image.Image, name: str) -> Image.Image:
    """Grey images with more than 8 bits per sample, scaled to 8 bits by their range (Pillow's
    own conversion clips at 255 instead):

    I;16 (all byte orders): 16-bit, 0..65535.
    I: Pillow keeps 8-, 16- and 32-bit samples alike in this 32-bit mode without saying which,
        so the smallest of 0..255, 0..65535 and 0..2**31-1 that holds the largest sample is
        white; negative samples are refused.
    F: floats in 0..1 (the usual convention), else 0..255 (Pillow's); others are refused.
    """
    mode = image.mode
    if not (mode == "I" or mode == "F" or mode.startswith("I;16")):
        return image
    values = np.asarray(image, dtype=np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode.startswith("I;16"):
        white = 65535.0
    elif mode == "I":
        if low < 0:
            raise InputError(f"image has negative 32-bit samples (down to {low:.0f}): {name}; hae reads "
                             "unsigned integer images (8, 16 or 32 bits)")
        white = 255.0 if high <= 255 else 65535.0 if high <= 65535 else float(_INT32_MAX)
    else:
        if not np.isfinite(values).all() or low < 0 or high > 255:
            raise InputError(f"image has float samples outside 0..1 and 0..255 (from {low:g} to {high:g}): "
                             f"{name}; scale it to 0..1 first")
        white = 1.0 if high <= 1.0 else 255.0
    eight_bit = np.clip(np.rint(values * (255.0 / white)), 0, 255).astype(np.uint8)
    converted = Image.fromarray(eight_bit, "L")
    transparent = image.info.get("transparency")
    if isinstance(transparent, (int, float)):  # a PNG's transparent grey, in the samples' own range
        converted.info["transparency"] = int(np.clip(round(transparent * 255.0 / white), 0, 255))
    return converted
