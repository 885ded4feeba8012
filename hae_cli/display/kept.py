"""The image with what the cache kept of it (`--show-kept FILE.png`): one row per image, its
crops as the model saw them (after the HD transform) and its global view, each 2x2-merged patch
(one image token) drawn as kept (the picture as is), evicted (dimmed to grey) or in the recycle
bin (tinted orange), each row's `sub_GN` separator as a small square at its end.

Drawn with Pillow (a core dependency), cell by cell, so a test can read a cell's status back
from its pixels; `KeptLayout` says where every cell lies.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from hae_cli.cache.kept import KeptMap
from hae_cli.errors import InputError
from hae_cli.model.image import CROPS_VIEW, GLB_GN_VIEW, GLOBAL_VIEW, image_slot_cells

CELL = 12  # pixels per merged patch (28 pixels of a 336-pixel crop)
SEPARATOR_GAP = 3
SEPARATOR_WIDTH = CELL // 2
VIEW_GAP = 44
MARGIN = 12
LABEL_HEIGHT = 22
ROW_GAP = 34  # room for the views' captions
HEADER_HEIGHT = 48  # one title line and the legend
TITLE_LINE = 18

GONE_GREY = np.array([40, 40, 40], dtype=np.float32)
BIN_ORANGE = np.array([235, 140, 20], dtype=np.float32)
SEPARATOR_KEPT = np.array([0, 150, 160], dtype=np.float32)
GONE_DIM = 0.78  # how far an evicted patch fades toward grey
BIN_TINT = 0.65  # how far a patch in the bin turns orange
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
FRAME = (150, 150, 150)
CROP_EDGE = (120, 170, 255)  # where one 336-pixel crop meets the next


@dataclass(frozen=True)
class ImageRow:
    """Where one image's row lies: the crops' map at (crops_x, y), the glb_GN square, the global
    view at (global_x, y); `cols`, `rows` in merged patches."""

    y: int
    crops_x: int
    crops_cols: int
    crops_rows: int
    glb_x: int
    global_x: int
    grid: int

    def cell_box(self, view: int, row: int, col: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), exclusive ends, of a cell; `col` == the view's width is its row's sub_GN."""
        if view == GLB_GN_VIEW:
            x, y = self.glb_x, self.y
        else:
            x0, width = (self.crops_x, self.crops_cols) if view == CROPS_VIEW else (self.global_x, self.grid)
            x = x0 + col * CELL + (SEPARATOR_GAP if col == width else 0)
            y = self.y + row * CELL
            if col == width:
                return x, y, x + SEPARATOR_WIDTH, y + CELL
        return x, y, x + CELL, y + CELL

    @property
    def height(self) -> int:
        return max(self.crops_rows, self.grid) * CELL


@dataclass(frozen=True)
class KeptLayout:
    width: int
    height: int
    rows: list[ImageRow]


def layout(image_layouts: list[dict], header_height: int = HEADER_HEIGHT) -> KeptLayout:
    rows, y, width = [], header_height, 0
    for entry in image_layouts:
        grid = entry["grid"]
        cols, n_rows = entry["w_crops"] * grid, entry["h_crops"] * grid
        crops_x = MARGIN
        glb_x = crops_x + cols * CELL + SEPARATOR_GAP + SEPARATOR_WIDTH + VIEW_GAP
        global_x = glb_x + CELL + VIEW_GAP
        row = ImageRow(y + LABEL_HEIGHT, crops_x, cols, n_rows, glb_x, global_x, grid)
        rows.append(row)
        y = row.y + row.height + ROW_GAP
        width = max(width, global_x + grid * CELL + SEPARATOR_GAP + SEPARATOR_WIDTH + MARGIN)
    return KeptLayout(max(width, 720), y, rows)  # at least the legend's width


def draw_kept(kept: KeptMap, layer: int, pictures: list[tuple[Image.Image, Image.Image]],
              image_layouts: list[dict], title: str) -> Image.Image:
    """The figure: `pictures` per image are (HD-transformed image, global view), `image_layouts`
    their crop grids (`RunResult.image_layouts`). A long title wraps at its " · "."""
    font, small = _font(13), _font(11)
    title_lines = _wrap(title, font, layout(image_layouts).width - 2 * MARGIN)
    plan = layout(image_layouts, HEADER_HEIGHT + TITLE_LINE * (len(title_lines) - 1))
    canvas = np.full((plan.height, plan.width, 3), 255, dtype=np.float32)
    labels = []
    for i, (row, (padded, global_view), entry) in enumerate(zip(plan.rows, pictures, image_layouts)):
        image = kept.images[i]
        share = kept.held_share(layer, image.index)
        in_bin = kept.in_bin[layer][i]
        cells = image_slot_cells(entry["h_crops"], entry["w_crops"], entry["grid"])
        maps = {
            CROPS_VIEW: _cells_of(padded, row.crops_cols, row.crops_rows),
            GLOBAL_VIEW: _cells_of(global_view, row.grid, row.grid),
        }
        for slot in range(image.count):
            view, r, c = int(cells.view[slot]), int(cells.row[slot]), int(cells.col[slot])
            x0, y0, x1, y1 = row.cell_box(view, r, c)
            separator = view == GLB_GN_VIEW or c == (row.crops_cols if view == CROPS_VIEW else row.grid)
            base = SEPARATOR_KEPT if separator else maps[view][r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL]
            canvas[y0:y1, x0:x1] = _status_colour(base, float(share[slot]), bool(in_bin[slot]))
        held, binned = kept.tokens_held(layer, image.index), kept.tokens_in_bin(layer, image.index)
        label = f"image {image.index}: {held} of {image.count} tokens held at layer {layer}"
        if binned:
            label += f", {binned} in the recycle bin"
        if kept.heads > 1 and np.any((share > 0) & (share < 1)):
            label += " (per head: lighter = held by more heads)"
        labels.append((row, label))

    figure = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(figure)
    for n, line in enumerate(title_lines):
        draw.text((MARGIN, 6 + n * TITLE_LINE), line, fill=INK, font=font)
    _legend(draw, font, MARGIN, 26 + TITLE_LINE * (len(title_lines) - 1))
    for row, entry in zip(plan.rows, image_layouts):
        _frame(draw, row, entry)
    for row, label in labels:
        draw.text((MARGIN, row.y - LABEL_HEIGHT + 3), label, fill=INK, font=font)
        below = row.y + row.height + 3
        draw.text((row.crops_x, below), "crops (after the HD transform)", fill=INK, font=small)
        draw.text((row.glb_x + CELL // 2, row.y + CELL + 3), "glb_GN", fill=INK, font=small, anchor="mt")
        draw.text((row.global_x, below), "global view", fill=INK, font=small)
    return figure


def save_png(figure: Image.Image, path: Path) -> Path:
    try:
        figure.save(path, format="PNG")
    except OSError as error:
        raise InputError(f"cannot write {path}: {error.strerror or error}") from None
    return path


def _frame(draw: ImageDraw.ImageDraw, row: ImageRow, entry: dict) -> None:
    """A frame around each view, just outside its cells (a kept white patch is not the page), and a
    line where one crop meets the next (on the cells' edge pixels, never their centres)."""
    crops_w, crops_h, side = row.crops_cols * CELL, row.crops_rows * CELL, row.grid * CELL
    draw.rectangle((row.crops_x - 1, row.y - 1, row.crops_x + crops_w, row.y + crops_h), outline=FRAME)
    draw.rectangle((row.global_x - 1, row.y - 1, row.global_x + side, row.y + side), outline=FRAME)
    for k in range(1, entry["w_crops"]):
        x = row.crops_x + k * side
        draw.line((x, row.y, x, row.y + crops_h - 1), fill=CROP_EDGE)
    for k in range(1, entry["h_crops"]):
        y = row.y + k * side
        draw.line((row.crops_x, y, row.crops_x + crops_w - 1, y), fill=CROP_EDGE)


def _cells_of(picture: Image.Image, cols: int, rows: int) -> np.ndarray:
    """The picture scaled so that each merged patch is one CELL x CELL square."""
    return np.asarray(picture.convert("RGB").resize((cols * CELL, rows * CELL), Image.Resampling.BOX),
                      dtype=np.float32)


def _status_colour(base: np.ndarray, share: float, in_bin: bool) -> np.ndarray:
    if in_bin:
        return base * (1 - BIN_TINT) + BIN_ORANGE * BIN_TINT
    fade = GONE_DIM * (1.0 - share)
    return base * (1 - fade) + GONE_GREY * fade


def _legend(draw: ImageDraw.ImageDraw, font, x: int, y: int) -> None:
    light = np.array([220.0] * 3)
    swatches = [
        ("kept: the patch as the model saw it", light),
        ("evicted", _status_colour(light, 0.0, False)),
        ("in the recycle bin", _status_colour(light, 0.0, True)),
        ("separator (sub_GN, glb_GN) kept", SEPARATOR_KEPT),
    ]
    for text, colour in swatches:
        fill = tuple(int(round(v)) for v in colour)
        draw.rectangle((x, y + 2, x + CELL, y + 2 + CELL), fill=fill, outline=(90, 90, 90))
        draw.text((x + CELL + 5, y), text, fill=INK, font=font)
        x += CELL + 5 + int(draw.textlength(text, font=font)) + 18


def _wrap(text: str, font, width: int) -> list[str]:
    """`text` in lines no wider than `width`, broken after a " · " (a part wider than that stays whole)."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines: list[str] = []
    for part in text.split(" · "):
        if lines and probe.textlength(lines[-1] + " · " + part, font=font) <= width:
            lines[-1] += " · " + part
        else:
            lines.append(part)
    return lines


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # a Pillow without FreeType: its bitmap font
        return ImageFont.load_default()


def write_kept_png(kept: KeptMap, layer: int, images: list, image_config, image_layouts: list[dict],
                   path: Path, title: str) -> Path:
    """Read the images again, as the model saw them, and write the figure for `layer`."""
    from hae_cli.model.image import load_image, views_as_seen

    pictures = [views_as_seen(load_image(image), image_config) for image in images]
    return save_png(draw_kept(kept, layer, pictures, image_layouts, title), Path(path))


def write_run_png(result, path: Path | None, layer: int | None, images: list, loaded, title: str) -> Path | None:
    """The --show-kept PNG of one run (`RunResult`); None when not asked for (`path` None) or when
    the run never reached the step asked for (`result.kept` None)."""
    if path is None or result.kept is None:
        return None
    step = result.kept.step
    when = "after prefill" if step == 0 else f"after decode step {step}"
    heading = f"{title} · {when} · layer {layer} of 0-{loaded.num_layers - 1}"
    return write_kept_png(result.kept, layer, list(images), loaded.image_config, result.image_layouts, path, heading)
