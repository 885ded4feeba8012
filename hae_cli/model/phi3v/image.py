"""Images in, crops and a token layout out: the one place that knows how Phi-3.5-Vision sees
an image.

The official processor (`image_processing_phi3_v.py`) resizes each image so that it tiles into
at most `num_crops` squares of `crop_size` pixels (the "HD transform"), feeds CLIP the crops
plus a global view, and lays the merged features out "sub_glb": the crop grid row by row, each
row closed by a `sub_GN` separator, then one `glb_GN`, then the global view the same way. The
prompt, the vision tower and the cache all need that layout; they get it from here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from hae_cli.cache.modality import Modality
from hae_cli.errors import CheckpointError, ConfigError, InputError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_WHITE = (255, 255, 255)


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ImageProcessorConfig:
    """How images are cut and normalised.

    num_crops: the most `crop_size` squares an image may tile into (the official HD
        transform's `hd_num`; 4 for Phi-3.5-V's multi-image use, 16 for Phi-3-V).
    crop_size: side of a crop and of the global view, the CLIP input size (336).
    patch_size: CLIP patch side (14); features are merged 2x2 after CLIP, so
        `crop_size // patch_size` must be even.
    image_mean, image_std: per-channel normalisation (CLIP's).
    """

    num_crops: int = 4
    crop_size: int = 336
    patch_size: int = 14
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        for field in ("num_crops", "crop_size", "patch_size"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{field} must be a whole number >= 1, got {value!r}")
        if self.crop_size % self.patch_size:
            raise ConfigError(
                f"crop_size {self.crop_size} is not a multiple of patch_size {self.patch_size}"
            )
        if (self.crop_size // self.patch_size) % 2:
            raise ConfigError(
                f"crop_size/patch_size = {self.crop_size // self.patch_size} must be even "
                "(features are merged 2x2)"
            )
        for field in ("image_mean", "image_std"):
            value = getattr(self, field)
            if len(value) != 3:
                raise ConfigError(f"{field} needs 3 values (R, G, B), got {list(value)}")
            object.__setattr__(self, field, tuple(float(v) for v in value))
        if min(self.image_std) <= 0:
            raise ConfigError(f"image_std values must be > 0, got {list(self.image_std)}")

    @property
    def merged_grid(self) -> int:
        """Side of one crop's feature grid after the 2x2 merge (12 for 336/14)."""
        return self.crop_size // self.patch_size // 2

    @classmethod
    def from_files(
        cls, folder: str | Path, crop_size: int, patch_size: int, num_crops: int | None = None
    ) -> "ImageProcessorConfig":
        """Read `preprocessor_config.json` from a checkpoint folder.

        crop_size and patch_size belong to the vision tower, so the caller passes them from the
        model config; `num_crops` (the user's choice) overrides the file's.
        """
        path = Path(folder) / "preprocessor_config.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except FileNotFoundError:
            raise CheckpointError(f"missing preprocessor_config.json in {folder}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"cannot read {path}: {e}") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{path} is not a JSON object")
        kwargs: dict = {"crop_size": crop_size, "patch_size": patch_size}
        for key in ("num_crops", "image_mean", "image_std"):
            if key in data:
                kwargs[key] = data[key]
        try:
            config = cls(**kwargs)
        except (ConfigError, TypeError) as e:
            raise CheckpointError(f"{path}: {e}") from None
        expected = data.get("num_img_tokens")
        if expected is not None and expected != config.merged_grid**2:
            raise CheckpointError(
                f"{path}: num_img_tokens {expected} does not match crop_size {crop_size} / "
                f"patch_size {patch_size} ({config.merged_grid**2} tokens per crop)"
            )
        if num_crops is not None:
            config = replace(config, num_crops=num_crops)
        return config


# --------------------------------------------------------------------------- HD transform


def _hd_geometry(width: int, height: int, num_crops: int, crop_size: int) -> tuple[bool, int, int]:
    """The official HD transform's arithmetic: (transposed, resized width, resized height),
    in the landscape orientation the transform works in."""
    if width < 1 or height < 1:
        raise InputError(f"image has zero size ({width}x{height})")
    if num_crops < 1 or crop_size < 1:
        raise ConfigError(f"num_crops and crop_size must be >= 1, got {num_crops}, {crop_size}")
    transposed = width < height
    if transposed:
        width, height = height, width
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_w = scale * crop_size
    # The official code yields 0 rows (and crashes) for extreme strips; keep at least one.
    new_h = max(1, int(new_w / ratio))
    return transposed, new_w, new_h


def check_shape(image: Image.Image, config: ImageProcessorConfig, name: str) -> None:
    """Refuse an image the HD transform would make thinner than one CLIP patch: the picture
    would be a line of pixels inside white padding, and the model would describe the padding."""
    _, new_w, new_h = _hd_geometry(image.width, image.height, config.num_crops, config.crop_size)
    if new_h >= config.patch_size:
        return
    long, short = (new_w, new_h) if image.width >= image.height else (new_h, new_w)
    crops = f"{config.num_crops} crop{'s' if config.num_crops != 1 else ''} of {config.crop_size} pixels"
    most = config.num_crops * config.crop_size // config.patch_size
    raise InputError(
        f"image is {image.width}x{image.height} pixels: {name}; the HD transform ({crops}) makes it {long}x{short} "
        f"pixels, thinner than one {config.patch_size}-pixel patch, so the model cannot see it; crop it, or pad it "
        f"to at most {most}:1"
    )


def crop_grid(width: int, height: int, num_crops: int, crop_size: int) -> tuple[int, int]:
    """(h_crops, w_crops) the HD transform will produce, without touching pixels.

    The prompt builder needs token counts before (or without) running the transform.
    """
    transposed, new_w, new_h = _hd_geometry(width, height, num_crops, crop_size)
    rows, cols = -(-new_h // crop_size), new_w // crop_size
    return (cols, rows) if transposed else (rows, cols)


def hd_transform(image: Image.Image, num_crops: int, crop_size: int) -> Image.Image:
    """The official HD transform: resize to `scale` crops wide keeping the aspect ratio, then
    pad the short side centred with white to a whole number of crops."""
    transposed, new_w, new_h = _hd_geometry(image.width, image.height, num_crops, crop_size)
    if image.mode != "RGB":
        image = image.convert("RGB")
    if transposed:
        image = image.transpose(Image.Transpose.TRANSPOSE)
    resized = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    target_h = -(-new_h // crop_size) * crop_size
    padded = Image.new("RGB", (new_w, target_h), _WHITE)
    padded.paste(resized, (0, (target_h - new_h) // 2))
    if transposed:
        padded = padded.transpose(Image.Transpose.TRANSPOSE)
    return padded


# --------------------------------------------------------------------------- token layout


def tokens_per_image(h_crops: int, w_crops: int, grid: int = 12) -> int:
    """Slots one image takes in the prompt: features of every crop and of the global view,
    one `sub_GN` per feature row (h*grid + grid rows) and one `glb_GN`."""
    if h_crops < 1 or w_crops < 1 or grid < 1:
        raise ValueError(f"grids must be >= 1, got {h_crops}x{w_crops} crops, grid {grid}")
    return (h_crops * w_crops + 1) * grid * grid + 1 + (h_crops + 1) * grid


def image_token_modalities(h_crops: int, w_crops: int, grid: int) -> torch.Tensor:
    """Modality of each of an image's slots, in the official "sub_glb" order, so the cache can
    tell visual features from separators.

    The crops tile a (h*grid) x (w*grid) feature map; each of its rows is followed by a
    `sub_GN`; then one `glb_GN`; then the global view's grid rows, each followed by a `sub_GN`.
    """
    total = tokens_per_image(h_crops, w_crops, grid)

    def rows(n_rows: int, row_len: int) -> torch.Tensor:
        row = torch.full((row_len + 1,), int(Modality.IMAGE), dtype=torch.int8)
        row[-1] = int(Modality.SEPARATOR)
        return row.repeat(n_rows)

    glb_gn = torch.tensor([int(Modality.SEPARATOR)], dtype=torch.int8)
    layout = torch.cat([rows(h_crops * grid, w_crops * grid), glb_gn, rows(grid, grid)])
    assert layout.numel() == total
    return layout


def image_token_overview(h_crops: int, w_crops: int, grid: int) -> torch.Tensor:
    """`[slots]` bool, True on the global view's features: the image's overview (the crops are
    its detail), in the same "sub_glb" layout as `image_token_modalities`."""
    layout = image_token_modalities(h_crops, w_crops, grid)
    overview = torch.zeros(layout.numel(), dtype=torch.bool)
    overview[layout.numel() - grid * (grid + 1) :] = True  # after glb_GN: grid rows + sub_GN each
    return overview & (layout == int(Modality.IMAGE))


# --------------------------------------------------------------------------- preprocessing


@dataclass
class ProcessedImage:
    """One image ready for the vision tower and the prompt.

    pixel_values: [1 + h_crops*w_crops, 3, crop, crop]; index 0 is the global view, then the
        crops row-major (the official order).
    num_tokens: slots the image takes in the prompt; `modalities` tags each of them, and
        `overview` marks the global view's features (None: not known).
    """

    pixel_values: torch.Tensor
    h_crops: int
    w_crops: int
    num_tokens: int
    modalities: torch.Tensor
    overview: torch.Tensor | None = None


def preprocess(image: Image.Image, config: ImageProcessorConfig) -> ProcessedImage:
    """HD transform, normalise (after padding, as the official code does), cut into crops and
    add the global view (the padded image resized bicubically to one crop)."""
    crop = config.crop_size
    padded = hd_transform(image, config.num_crops, crop)
    h_crops, w_crops = padded.height // crop, padded.width // crop
    # Channels-last while normalising: contiguous in-place passes, then one copy into crops.
    pixels = torch.from_numpy(np.array(padded, dtype=np.uint8)).float()
    pixels.div_(255.0).sub_(torch.tensor(config.image_mean)).div_(torch.tensor(config.image_std))
    image_chw = pixels.permute(2, 0, 1)
    pixel_values = torch.empty(1 + h_crops * w_crops, 3, crop, crop)
    pixel_values[0] = F.interpolate(
        image_chw[None], size=(crop, crop), mode="bicubic", align_corners=False
    )[0]
    tiles = pixels.reshape(h_crops, crop, w_crops, crop, 3)
    pixel_values[1:] = tiles.permute(0, 2, 4, 1, 3).flatten(0, 1)  # row-major crops
    grid = config.merged_grid
    return ProcessedImage(
        pixel_values=pixel_values,
        h_crops=h_crops,
        w_crops=w_crops,
        num_tokens=tokens_per_image(h_crops, w_crops, grid),
        modalities=image_token_modalities(h_crops, w_crops, grid),
        overview=image_token_overview(h_crops, w_crops, grid),
    )


@dataclass(frozen=True)
class SlotCells:
    """Where each of an image's slots sits in the picture, in the "sub_glb" layout of
    `image_token_modalities`: `view` 0 for the crops' feature map ((h*grid) x (w*grid) merged
    patches), 1 for the `glb_GN` between them, 2 for the global view (grid x grid); `row`, `col`
    in that view's map, where `col` == its width marks the row's `sub_GN` (glb_GN: row 0, col 0)."""

    view: np.ndarray  # [slots] int8
    row: np.ndarray  # [slots] int32
    col: np.ndarray  # [slots] int32


CROPS_VIEW, GLB_GN_VIEW, GLOBAL_VIEW = 0, 1, 2


def image_slot_cells(h_crops: int, w_crops: int, grid: int) -> SlotCells:
    total = tokens_per_image(h_crops, w_crops, grid)

    def rows(n_rows: int, row_len: int, view: int):
        row, col = np.divmod(np.arange(n_rows * (row_len + 1)), row_len + 1)
        return np.full(row.size, view), row, col

    crops, glb, global_view = rows(h_crops * grid, w_crops * grid, CROPS_VIEW), rows(1, 0, GLB_GN_VIEW), rows(
        grid, grid, GLOBAL_VIEW)
    view, row, col = (np.concatenate(parts) for parts in zip(crops, glb, global_view))
    assert view.size == total
    return SlotCells(view.astype(np.int8), row.astype(np.int32), col.astype(np.int32))


def image_cells(h_crops: int, w_crops: int, grid: int, padded: Image.Image | None = None,
                global_view: Image.Image | None = None):
    """What `--show-kept` draws of an image: the crops (after the HD transform, each crop a
    `grid` x `grid` map of merged patches, each row closed by a `sub_GN`), the `glb_GN` between,
    and the global view (pictures from `views_as_seen`; None: the geometry only)."""
    from hae_cli.model.interface import ImageCells, PictureView

    cells = image_slot_cells(h_crops, w_crops, grid)
    views = [
        PictureView("crops (after the HD transform)", padded, w_crops * grid, h_crops * grid, (h_crops, w_crops),
                    row_separators=True),
        PictureView("glb_GN", None, 1, 1, separator=True),
        PictureView("global view", global_view, grid, grid, row_separators=True),
    ]
    assert [CROPS_VIEW, GLB_GN_VIEW, GLOBAL_VIEW] == [0, 1, 2]
    return ImageCells(views, cells.view, cells.row, cells.col, "sub_GN, glb_GN")


def views_as_seen(image: Image.Image, config: ImageProcessorConfig) -> tuple[Image.Image, Image.Image]:
    """The pictures behind an image's tokens, as 8-bit RGB: (the HD-transformed image its crops are
    cut from, the global view: that image resized to one crop), for showing what the cache keeps."""
    padded = hd_transform(image, config.num_crops, config.crop_size)
    size = (config.crop_size, config.crop_size)
    return padded, padded.resize(size, Image.Resampling.BICUBIC)
