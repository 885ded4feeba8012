"""The image with what the cache kept of it (`--show-kept FILE.png`): one row per image, each of
its views as the model saw it (for Phi-3.5-V: its crops after the HD transform, the `glb_GN`
between, its global view), each image token's cell drawn as kept (the picture as is), evicted
(dimmed to grey) or in the recycle bin (tinted orange), a row's separator token as a small
square at the row's end. A patch held by some of the heads (per-head policies) is a gauge: the
picture fills the held share of the cell from the bottom, evicted grey the rest, readable on
any colour. The family says what its views are (`VisionLanguageModel.image_cells`).

Drawn with Pillow (a core dependency), cell by cell, so a test can read a cell's status back
from its pixels; `KeptLayout` says where every cell lies.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from hae_cli.cache.kept_map import KeptMap
from hae_cli.checks import write_failed
from hae_cli.model.interface import ImageCells, PictureView

CELL = 12  # pixels per image token (a merged patch: 28 pixels of a 336-pixel crop)
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
RESERVE_BLUE = np.array([70, 90, 230], dtype=np.float32)
SEPARATOR_KEPT = np.array([0, 150, 160], dtype=np.float32)
GONE_DIM = 0.78  # how far an evicted patch fades toward grey
BIN_TINT = 0.65  # how far a patch in the bin turns orange
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
FRAME = (150, 150, 150)
CROP_EDGE = (120, 170, 255)  # where one 336-pixel crop meets the next


@dataclass(frozen=True)
class ImageRow:
    """Where one image's row lies: its views side by side from `xs[v]` on, at height `y`."""

    y: int
    xs: tuple[int, ...]
    views: tuple[PictureView, ...]

    def cell_box(self, view: int, row: int, col: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), exclusive ends, of a cell; `col` == the view's `cols` is its row's separator."""
        shown, x0 = self.views[view], self.xs[view]
        if shown.separator:  # separator tokens, one cell each
            x, y = x0 + col * CELL, self.y + row * CELL
            return x, y, x + CELL, y + CELL
        x = x0 + col * CELL + (SEPARATOR_GAP if col == shown.cols else 0)
        y = self.y + row * CELL
        if col == shown.cols:
            return x, y, x + SEPARATOR_WIDTH, y + CELL
        return x, y, x + CELL, y + CELL

    @property
    def height(self) -> int:
        return max(view.rows for view in self.views) * CELL


@dataclass(frozen=True)
class KeptLayout:
    width: int
    height: int
    rows: list[ImageRow]


def _view_width(view: PictureView) -> int:
    return view.cols * CELL + (SEPARATOR_GAP + SEPARATOR_WIDTH if view.row_separators else 0)


def _caption_width(caption: str) -> int:
    """Room a view's caption takes, so that no caption runs into the next view's."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    return int(probe.textlength(caption, font=_font(11)))


def layout(images: list[ImageCells], header_height: int = HEADER_HEIGHT) -> KeptLayout:
    rows, y, width = [], header_height, 0
    for cells in images:
        xs, x = [], MARGIN
        for view in cells.views:
            xs.append(x)
            x += max(_view_width(view), _caption_width(view.caption)) + VIEW_GAP
        row = ImageRow(y + LABEL_HEIGHT, tuple(xs), tuple(cells.views))
        rows.append(row)
        y = row.y + row.height + ROW_GAP
        width = max(width, x - VIEW_GAP + MARGIN)
    return KeptLayout(max(width, _legend_width(separator_names(images))), y, rows)


def draw_kept(kept: KeptMap, layer: int, images: list[ImageCells], title: str) -> Image.Image:
    """The figure: `images` are each image's views and cells (`VisionLanguageModel.image_cells`).
    A long title wraps at its " · "."""
    font, small = _font(13), _font(11)
    title_lines = _wrap(title, font, layout(images).width - 2 * MARGIN)
    plan = layout(images, HEADER_HEIGHT + TITLE_LINE * (len(title_lines) - 1))
    canvas = np.full((plan.height, plan.width, 3), 255, dtype=np.float32)
    labels = []
    for i, (row, cells) in enumerate(zip(plan.rows, images)):
        image = kept.images[i]
        share = kept.held_share(layer, image.index)
        in_bin = kept.in_bin[layer][i]
        in_reserve = kept.reserved(layer, image.index)
        maps = {v: _cells_of(view.picture, view.cols, view.rows) for v, view in enumerate(cells.views)
                if not view.separator}
        for slot in range(image.count):
            v, r, c = int(cells.view[slot]), int(cells.row[slot]), int(cells.col[slot])
            view = cells.views[v]
            x0, y0, x1, y1 = row.cell_box(v, r, c)
            separator = view.separator or (view.row_separators and c == view.cols)
            base = SEPARATOR_KEPT if separator else maps[v][r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL]
            base = np.broadcast_to(base, (y1 - y0, x1 - x0, 3))
            canvas[y0:y1, x0:x1] = cell_pixels(base, float(share[slot]), bool(in_bin[slot]), bool(in_reserve[slot]))
        held, binned = kept.tokens_held(layer, image.index), kept.tokens_in_bin(layer, image.index)
        label = f"image {image.index}: {held} of {image.count} tokens held at layer {layer}"
        if binned:
            label += f", {binned} in the recycle bin"
        reserved = kept.tokens_in_reserve(layer, image.index)
        if reserved:
            label += f", {reserved} in the reserve"
        if kept.heads > 1 and np.any((share > 0) & (share < 1)):
            label += " (per head: the picture fills the share of heads holding a patch)"
        labels.append((row, label))

    figure = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(figure)
    for n, line in enumerate(title_lines):
        draw.text((MARGIN, 6 + n * TITLE_LINE), line, fill=INK, font=font)
    _legend(figure, draw, font, MARGIN, 26 + TITLE_LINE * (len(title_lines) - 1), separator_names(images))
    for row in plan.rows:
        _frame(draw, row)
    for row, label in labels:
        draw.text((MARGIN, row.y - LABEL_HEIGHT + 3), label, fill=INK, font=font)
        below = row.y + row.height + 3
        for x, view in zip(row.xs, row.views):
            if view.separator:
                draw.text((x, row.y + view.rows * CELL + 3), view.caption, fill=INK, font=small)
            else:
                draw.text((x, below), view.caption, fill=INK, font=small)
    return figure


def save_png(figure: Image.Image, path: Path) -> Path:
    try:
        figure.save(path, format="PNG")
    except OSError as error:
        raise write_failed(error, path) from None
    return path


def _frame(draw: ImageDraw.ImageDraw, row: ImageRow) -> None:
    """A frame around each picture view, just outside its cells (a kept white patch is not the
    page), and a line where one of its tiles meets the next (on the cells' edge pixels, never
    their centres)."""
    for x0, view in zip(row.xs, row.views):
        if view.separator:
            continue
        width, height = view.cols * CELL, view.rows * CELL
        draw.rectangle((x0 - 1, row.y - 1, x0 + width, row.y + height), outline=FRAME)
    for x0, view in zip(row.xs, row.views):
        tile_rows, tile_cols = view.tiles
        width, height = view.cols * CELL, view.rows * CELL
        for k in range(1, tile_cols):
            x = x0 + k * width // tile_cols
            draw.line((x, row.y, x, row.y + height - 1), fill=CROP_EDGE)
        for k in range(1, tile_rows):
            y = row.y + k * height // tile_rows
            draw.line((x0, y, x0 + width - 1, y), fill=CROP_EDGE)


def _cells_of(picture: Image.Image, cols: int, rows: int) -> np.ndarray:
    """The picture scaled so that each merged patch is one CELL x CELL square."""
    return np.asarray(picture.convert("RGB").resize((cols * CELL, rows * CELL), Image.Resampling.BOX),
                      dtype=np.float32)


def _status_colour(base: np.ndarray, share: float, in_bin: bool, in_reserve: bool = False) -> np.ndarray:
    if in_bin:
        return base * (1 - BIN_TINT) + BIN_ORANGE * BIN_TINT
    if in_reserve:
        return base * (1 - BIN_TINT) + RESERVE_BLUE * BIN_TINT
    fade = GONE_DIM * (1.0 - share)
    return base * (1 - fade) + GONE_GREY * fade


def cell_pixels(base: np.ndarray, share: float, in_bin: bool, in_reserve: bool = False) -> np.ndarray:
    """A cell's pixels (`base`: rows x cols x 3, the picture or a colour) for a patch held by
    `share` of the heads: the picture (1), evicted grey (0), or, in between, a gauge: the picture
    in the bottom `share` of the rows, grey above."""
    if in_bin or in_reserve or share >= 1.0 or share <= 0.0:
        return _status_colour(base, 1.0 if share >= 1.0 else 0.0, in_bin, in_reserve)
    rows = base.shape[0]
    held = min(rows - 1, max(1, round(share * rows)))
    out = _status_colour(base, 0.0, False)
    out[rows - held:] = base[rows - held:]
    return out


def _sample_picture() -> np.ndarray:
    """A swatch that looks like a picture: four colours, as a kept patch shows its own."""
    swatch = np.empty((CELL, CELL, 3), dtype=np.float32)
    half = CELL // 2
    swatch[:half, :half], swatch[:half, half:] = (230, 90, 70), (90, 170, 230)
    swatch[half:, :half], swatch[half:, half:] = (250, 210, 80), (110, 190, 110)
    return swatch


def legend_swatches(separator_names: str = "") -> list[tuple[str, np.ndarray]]:
    """(label, CELL x CELL pixels) for the legend, each drawn as the cells are."""
    picture = _sample_picture()
    return [
        ("kept: the patch as the model saw it", cell_pixels(picture, 1.0, False)),
        ("evicted", cell_pixels(picture, 0.0, False)),
        ("in the recycle bin", cell_pixels(picture, 0.0, True)),
        ("in the reserve", cell_pixels(picture, 0.0, False, True)),
        ("held by half the heads", cell_pixels(picture, 0.5, False)),
        (f"separator ({separator_names}) kept" if separator_names else "separator kept",
         np.broadcast_to(SEPARATOR_KEPT, (CELL, CELL, 3))),
    ]


def separator_names(images: list[ImageCells]) -> str:
    """What the family calls its separator tokens (the legend's words), from its images' cells."""
    return next((cells.separator_names for cells in images if cells.separator_names), "")


def _legend_width(names: str) -> int:
    """The legend's width with the family's own separator names (Gemma 3's are long)."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    texts = [text for text, _ in legend_swatches(names)]
    return 2 * MARGIN + sum(CELL + 5 + int(probe.textlength(text, font=_font(13))) + 18 for text in texts)


def _legend(image: Image.Image, draw: ImageDraw.ImageDraw, font, x: int, y: int, separator_names: str = "") -> None:
    for text, pixels in legend_swatches(separator_names):
        swatch = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
        image.paste(swatch, (x, y + 2))
        draw.rectangle((x - 1, y + 1, x + CELL, y + 2 + CELL), outline=(90, 90, 90))
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


def write_kept_png(kept: KeptMap, layer: int, images: list, layouts: list[dict], loaded, path: Path,
                   title: str) -> Path:
    """Read the images again and write the figure for `layer`, each image cut as its `layouts`
    entry says (`RunResult.image_layouts`)."""
    from hae_cli.model.image_file import load_image

    cells = [loaded.image_cells(load_image(image), layout) for image, layout in zip(images, layouts)]
    return save_png(draw_kept(kept, layer, cells, title), Path(path))


def write_run_png(result, path: Path | None, layer: int | None, images: list, loaded, title: str) -> Path | None:
    """The --show-kept PNG of one run (`RunResult`); None when not asked for (`path` None) or when
    the run never reached the step asked for (`result.kept` None)."""
    if path is None or result.kept is None:
        return None
    step = result.kept.step
    when = "after prefill" if step == 0 else f"after decode step {step}"
    heading = f"{title} · {when} · layer {layer} of 0-{loaded.num_layers - 1}"
    return write_kept_png(result.kept, layer, list(images), result.image_layouts, loaded, path, heading)
