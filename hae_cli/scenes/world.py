"""Scenes of several labelled objects: a world where a compressed cache can lose the answer.

An image is a square canvas of `crops` Phi-3.5-V crops (336 px each side: 672x672 for 4,
1344x1344 for 16), cut into slots of 168 px (4x4 slots at 672, 8x8 at 1344). Each object fills
one slot: a shape (circle, square, triangle, star) in a colour, small or large, and at its centre
a small white tag with a digit drawn from a 5x7 bitmap font.

The geometry is chosen against the model's tokens, so that what a question needs sits in known
tokens:
- an object's centre is the centre of a 14-px patch, so its whole tag (9x11 px) lies inside one
  patch, the top-left patch of a 2x2-merged token (28 px);
- at crop resolution (1:1) the digit is 5x7 pixels with one-pixel strokes: readable; in the
  global view (the whole image at 336 px) it is under 3x4 pixels, a white blob with no digit.
  Colour, shape, count, existence and place are visible in the global view; the label only in
  the crops.
- each (colour, shape) pair occurs at most once in an image, so "the red square" names one object.

Drawing is PIL with no anti-aliasing and no font files: the same seed gives the same pixels.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 60, 180),
    "orange": (240, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}
SIZES = {"small": 24, "large": 38}  # radius in px
DIGITS = tuple(str(d) for d in range(10))

CROP = 336  # Phi-3.5-V's crop side
PATCH = 14  # the CLIP tower's patch side
CELL = 2 * PATCH  # one token after the 2x2 merge
SLOT = 6 * CELL  # one object's square
CROP_CHOICES = (1, 4, 16)  # crops per image: an n x n grid of crops, n = 1, 2, 4
BACKGROUNDS = ((236, 236, 236), (242, 236, 222), (226, 234, 240), (232, 240, 228))

# 5x7 digits, one string per row, "#" = ink.
_FONT = {
    "0": (" ### ", "#   #", "#  ##", "# # #", "##  #", "#   #", " ### "),
    "1": ("  #  ", " ##  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "),
    "2": (" ### ", "#   #", "    #", "   # ", "  #  ", " #   ", "#####"),
    "3": ("#####", "   # ", "  #  ", "   # ", "    #", "#   #", " ### "),
    "4": ("   # ", "  ## ", " # # ", "#  # ", "#####", "   # ", "   # "),
    "5": ("#####", "#    ", "#### ", "    #", "    #", "#   #", " ### "),
    "6": ("  ## ", " #   ", "#    ", "#### ", "#   #", "#   #", " ### "),
    "7": ("#####", "    #", "   # ", "  #  ", " #   ", " #   ", " #   "),
    "8": (" ### ", "#   #", "#   #", " ### ", "#   #", "#   #", " ### "),
    "9": (" ### ", "#   #", "#   #", " ####", "    #", "   # ", " ##  "),
}
GLYPH = np.array([[[c == "#" for c in row] for row in _FONT[d]] for d in DIGITS])  # [10, 7, 5]
TAG_HALF = (5, 4)  # the white tag: 11 rows x 9 columns around the centre


@dataclass(frozen=True)
class SceneObject:
    """One object: what it is, and where (its slot, its centre in pixels, its radius)."""

    color: str
    shape: str
    size: str
    label: str
    slot: tuple[int, int]  # (row, column) of its slot
    center: tuple[int, int]  # (x, y) in pixels, the centre of a patch
    radius: int

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """An image's content; `render()` draws it."""

    side: int  # pixels per side
    background: tuple[int, int, int]
    objects: tuple[SceneObject, ...]

    def in_reading_order(self) -> list[SceneObject]:
        """Top to bottom by slot row, then left to right: the order a caption names them."""
        return sorted(self.objects, key=lambda o: o.slot)

    def find(self, color: str | None = None, shape: str | None = None) -> list[SceneObject]:
        return [o for o in self.objects if color in (None, o.color) and shape in (None, o.shape)]

    def render(self):
        from PIL import Image, ImageDraw

        picture = Image.new("RGB", (self.side, self.side), self.background)
        draw = ImageDraw.Draw(picture)
        for o in self.objects:
            _draw_shape(draw, o)
        pixels = np.array(picture)
        for o in self.objects:
            _draw_tag(pixels, o)
        return Image.fromarray(pixels)


def slots_per_side(crops: int) -> int:
    return _grid(crops) * CROP // SLOT


def max_objects(crops: int) -> int:
    """The most objects a scene of `crops` crops holds: one a slot, each (colour, shape) once."""
    return min(slots_per_side(crops) ** 2, len(COLORS) * len(SHAPES))


def make_scene(rng: random.Random, crops: int = 4, objects: tuple[int, int] = (3, 12)) -> Scene:
    """A random scene of `objects[0]`-`objects[1]` objects on a canvas of `crops` crops."""
    low, high = objects
    if not 1 <= low <= high:
        raise ValueError(f"objects must be 1 <= min <= max, got {low}-{high}")
    if high > max_objects(crops):
        raise ValueError(f"at most {max_objects(crops)} objects fit a {crops}-crop scene "
                         f"(one per {SLOT}-px slot, each colour and shape once), asked for up to {high}")
    per_side = slots_per_side(crops)
    count = rng.randint(low, high)
    slots = rng.sample([(r, c) for r in range(per_side) for c in range(per_side)], count)
    kinds = rng.sample([(c, s) for c in COLORS for s in SHAPES], count)
    placed = []
    for (row, column), (color, shape) in zip(slots, kinds):
        size = rng.choice(tuple(SIZES))
        # the centre of a patch near the slot's middle: the slot's cell 2 or 3, their top-left patch
        x = column * SLOT + rng.choice((2, 3)) * CELL + PATCH // 2
        y = row * SLOT + rng.choice((2, 3)) * CELL + PATCH // 2
        placed.append(SceneObject(color, shape, size, rng.choice(DIGITS), (row, column), (x, y), SIZES[size]))
    return Scene(per_side * SLOT, rng.choice(BACKGROUNDS), tuple(placed))


def _grid(crops: int) -> int:
    if crops not in CROP_CHOICES:
        raise ValueError(f"crops must be one of {', '.join(map(str, CROP_CHOICES))}, got {crops}")
    return int(round(crops ** 0.5))


def object_map(scene: Scene) -> np.ndarray:
    """`[side, side]` uint8: which object covers each pixel (its index + 1; 0 = background), the
    tags included: where a trainer reads what each patch shows."""
    from PIL import Image, ImageDraw

    picture = Image.new("L", (scene.side, scene.side), 0)
    draw = ImageDraw.Draw(picture)
    for index, o in enumerate(scene.objects, start=1):
        _draw_shape(draw, o, fill=index)
    pixels = np.array(picture)
    for index, o in enumerate(scene.objects, start=1):
        x, y = o.center
        pixels[y - TAG_HALF[0]: y + TAG_HALF[0] + 1, x - TAG_HALF[1]: x + TAG_HALF[1] + 1] = index
    return pixels


def _draw_shape(draw, o: SceneObject, fill=None) -> None:
    x, y, r = *o.center, o.radius
    fill = COLORS[o.color] if fill is None else fill
    if o.shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif o.shape == "square":
        side = int(r * 0.85)
        draw.rectangle((x - side, y - side, x + side, y + side), fill=fill)
    elif o.shape == "triangle":
        draw.polygon([(x, y - r), (x + r, y + int(r * 0.8)), (x - r, y + int(r * 0.8))], fill=fill)
    else:  # a five-pointed star
        points = []
        for k in range(10):
            angle = np.pi / 2 + k * np.pi / 5
            reach = r if k % 2 == 0 else r * 0.45
            points.append((x + reach * np.cos(angle), y - reach * np.sin(angle)))
        draw.polygon([(round(px), round(py)) for px, py in points], fill=fill)


def _draw_tag(pixels: np.ndarray, o: SceneObject) -> None:
    x, y = o.center
    (half_rows, half_columns), (rows, columns) = TAG_HALF, GLYPH.shape[1:]
    pixels[y - half_rows: y + half_rows + 1, x - half_columns: x + half_columns + 1] = 255
    glyph = GLYPH[int(o.label)]
    top, left = y - rows // 2, x - columns // 2
    pixels[top: top + rows, left: left + columns][glyph] = 0
