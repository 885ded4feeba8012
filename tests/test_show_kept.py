"""`--show-kept`: a cache holding a known set of image 1's patches is drawn with exactly those
cells kept (read back from the PNG's pixels), for a crop and for the global view, and the JSON
mask says what the cache's layers hold."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hae_cli.cache import EvictingCache
from hae_cli.cache.kept_map import image_slots, kept_json, kept_map
from hae_cli.cache.rounds import evict_to_bin
from hae_cli.cli.validate import check_writable
from hae_cli.display.kept_png import draw_kept, layout
from hae_cli.errors import InputError
from hae_cli.model.phi3v.image import CROPS_VIEW, GLOBAL_VIEW, image_cells, image_token_modalities

GRID = 12
H_CROPS, W_CROPS = 1, 2  # image 1: a 1x2 crop grid
TEXT_BEFORE = 5
KV_HEADS = 2


def slot_of(view: int, row: int, col: int, h_crops: int = H_CROPS, w_crops: int = W_CROPS) -> int:
    """The slot of merged patch (row, col), written out from the "sub_glb" layout itself: crop rows
    of w*grid patches + 1 sub_GN, then glb_GN, then the global view's rows of grid + 1."""
    if view == CROPS_VIEW:
        return row * (w_crops * GRID + 1) + col
    crops = h_crops * GRID * (w_crops * GRID + 1)
    return crops + 1 + row * (GRID + 1) + col


# Patches of image 1 that the cache keeps: some in the crops' map (both crops), some in the global view.
KEPT_CROPS = {(0, 0), (0, 13), (3, 5), (11, 23), (7, 12)}
KEPT_GLOBAL = {(0, 0), (5, 6), (11, 11)}
BINNED_CROPS = {(2, 2), (9, 20)}
SEPARATORS_KEPT = {slot_of(CROPS_VIEW, 4, W_CROPS * GRID)}  # the sub_GN closing crop row 4


def prompt_tags():
    """Text, image 1 (1x2 crops), a little text, image 2 (1x1 crop), text."""
    first = image_token_modalities(H_CROPS, W_CROPS, GRID)
    second = image_token_modalities(1, 1, GRID)
    parts = [torch.zeros(TEXT_BEFORE, dtype=torch.int8), first, torch.zeros(3, dtype=torch.int8), second,
             torch.zeros(4, dtype=torch.int8)]
    modality = torch.cat(parts)
    image_id = torch.cat([torch.zeros(TEXT_BEFORE), torch.ones(first.numel()), torch.zeros(3),
                          torch.full((second.numel(),), 2), torch.zeros(4)]).to(torch.int16)
    return modality, image_id


def known_cache() -> tuple[EvictingCache, torch.Tensor]:
    """Every layer holds the text, image 2 whole, and of image 1 only the known patches; layer 1 also
    has the known bin. Layer 0 differs per head: head 1 also holds the first global patch row."""
    modality, image_id = prompt_tags()
    length = modality.numel()
    cache = EvictingCache("full", num_layers=2)
    start = TEXT_BEFORE
    kept = {slot_of(CROPS_VIEW, r, c) for r, c in KEPT_CROPS} | {slot_of(GLOBAL_VIEW, r, c) for r, c in KEPT_GLOBAL}
    kept |= SEPARATORS_KEPT
    binned = {slot_of(CROPS_VIEW, r, c) for r, c in BINNED_CROPS}
    keep_rows = [p for p in range(length) if image_id[p] != 1 or (p - start) in kept]
    for index, layer in enumerate(cache.layers):
        keys = torch.randn(1, KV_HEADS, length, 4)
        layer.append(keys, keys.clone(), torch.arange(length), modality, image_id)
        if index == 1:
            evict_to_bin(layer, cache.asides[index].bin, torch.tensor(sorted(start + s for s in binned)))
            held = layer.token_index[0].tolist()
            layer.compact(torch.tensor([i for i, p in enumerate(held) if p in keep_rows]))
        else:
            extra = [start + slot_of(GLOBAL_VIEW, 0, c) for c in range(1, GRID)]
            rows = []
            for head in range(KV_HEADS):
                wanted = set(keep_rows) | (set(extra) if head == 1 else set())
                chosen = [p for p in range(length) if p in wanted]
                rows.append(chosen)
            # rows per head must be equal in number: head 0 keeps as many extra text-free image-2 rows
            short = len(rows[1]) - len(rows[0])
            rows[0] = sorted(rows[0] + [p for p in range(length) if p not in rows[0]][:short])
            layer.compact(torch.tensor(rows))
    cache.image_sizes = [int((image_id == 1).sum()), int((image_id == 2).sum())]
    return cache, image_id


LAYOUTS = [{"h_crops": H_CROPS, "w_crops": W_CROPS, "grid": GRID}, {"h_crops": 1, "w_crops": 1, "grid": GRID}]


def phi_cells(layouts, pictures=None):
    """Phi-3.5-V's views of each image (`layouts` as `RunResult.image_layouts` gives them)."""
    pictures = pictures or [(None, None)] * len(layouts)
    return [image_cells(e["h_crops"], e["w_crops"], e["grid"], *views) for e, views in zip(layouts, pictures)]


def white_pictures():
    return [(Image.new("RGB", (W_CROPS * 336, H_CROPS * 336), "white"), Image.new("RGB", (336, 336), "white")),
            (Image.new("RGB", (336, 336), "white"), Image.new("RGB", (336, 336), "white"))]


def cell_status(png: np.ndarray, box) -> str:
    x0, y0, x1, y1 = box
    r, g, b = (int(v) for v in png[(y0 + y1) // 2, (x0 + x1) // 2])
    if (r, g, b) == (255, 255, 255):
        return "kept"
    if r == g == b and r < 128:
        return "evicted"
    if r > g > b:
        return "bin"
    return f"other{(r, g, b)}"


def read_back(tmp_path, layer: int):
    cache, image_id = known_cache()
    kept = kept_map(cache, image_slots(image_id), step=0)
    path = tmp_path / "kept.png"
    draw_kept(kept, layer, phi_cells(LAYOUTS, white_pictures()), "test").save(path)
    png = np.asarray(Image.open(path).convert("RGB"))
    return kept, png, layout(phi_cells(LAYOUTS)).rows[0]


def test_png_cells_of_image_1_are_exactly_the_kept_patches(tmp_path):
    kept, png, row = read_back(tmp_path, layer=1)
    seen_crops = {(r, c): cell_status(png, row.cell_box(CROPS_VIEW, r, c))
                  for r in range(H_CROPS * GRID) for c in range(W_CROPS * GRID)}
    assert {rc for rc, s in seen_crops.items() if s == "kept"} == KEPT_CROPS
    assert {rc for rc, s in seen_crops.items() if s == "bin"} == BINNED_CROPS
    assert all(s in ("kept", "bin", "evicted") for s in seen_crops.values())
    seen_global = {(r, c): cell_status(png, row.cell_box(GLOBAL_VIEW, r, c)) for r in range(GRID) for c in range(GRID)}
    assert {rc for rc, s in seen_global.items() if s == "kept"} == KEPT_GLOBAL
    assert {rc for rc, s in seen_global.items() if s != "kept"} == {(r, c) for r in range(GRID) for c in range(GRID)} - KEPT_GLOBAL


def test_png_separator_cells_show_their_status(tmp_path):
    _, png, row = read_back(tmp_path, layer=1)
    teal = [tuple(png[(b[1] + b[3]) // 2, (b[0] + b[2]) // 2])
            for b in (row.cell_box(CROPS_VIEW, r, W_CROPS * GRID) for r in range(H_CROPS * GRID))]
    kept_rows = [r for r, colour in enumerate(teal) if colour == (0, 150, 160)]
    assert kept_rows == [4]


def test_png_shades_a_patch_held_by_some_heads(tmp_path):
    """A patch held by some of the heads is a gauge: the picture (white here) fills the held share
    of its cell from the bottom, evicted grey the rest."""
    _, png, row = read_back(tmp_path, layer=0)

    def cell(r: int, c: int) -> np.ndarray:
        x0, y0, x1, y1 = row.cell_box(GLOBAL_VIEW, r, c)
        return png[y0:y1, x0:x1]

    full, half, gone = cell(0, 0), cell(0, 1), cell(1, 1)
    assert (full == 255).all() and int(gone[0, 0, 0]) < 128
    assert (half[-1] == 255).all() and (half[0] == gone[0]).all()


def test_json_mask_matches_the_cache():
    cache, image_id = known_cache()
    payload = kept_json(kept_map(cache, image_slots(image_id), step=3), LAYOUTS)
    assert payload["step"] == 3 and payload["kv_heads"] == KV_HEADS
    first, second = payload["images"]
    assert (first["first_position"], first["slots"], first["w_crops"]) == (TEXT_BEFORE, int((image_id == 1).sum()), 2)
    for entry in (first, second):
        for layer_entry in entry["layers"]:
            layer = cache.layers[layer_entry["layer"]]
            mask = layer_entry["mask"]
            assert len(mask) == entry["slots"]
            for head in range(KV_HEADS):
                held = {p - entry["first_position"] for p in layer.token_index[head].tolist()
                        if 0 <= p - entry["first_position"] < entry["slots"]}
                assert all(mask[s] in "#+" for s in held)
                if "heads_holding" not in layer_entry:
                    assert {s for s, ch in enumerate(mask) if ch == "#"} == held
            binned = {p - entry["first_position"] for p in cache.asides[layer_entry["layer"]].bin.token_index.tolist()
                      if 0 <= p - entry["first_position"] < entry["slots"]}
            assert {s for s, ch in enumerate(mask) if ch == "b"} == binned
            assert layer_entry["held"] == sum(ch == "#" for ch in mask) or "heads_holding" in layer_entry
    layer1 = first["layers"][1]["mask"]
    expected = {slot_of(CROPS_VIEW, r, c) for r, c in KEPT_CROPS} | {slot_of(GLOBAL_VIEW, r, c) for r, c in KEPT_GLOBAL}
    assert {s for s, ch in enumerate(layer1) if ch == "#"} == expected | SEPARATORS_KEPT
    assert second["layers"][1]["mask"] == "#" * second["slots"]
    layer0 = first["layers"][0]
    assert layer0["heads_holding"][slot_of(GLOBAL_VIEW, 0, 1)] == 1
    assert layer0["mask"][slot_of(GLOBAL_VIEW, 0, 1)] == "+"


@pytest.mark.parametrize("name, fragment", [
    ("kept.jpg", "ending in .png"),
    ("missing/kept.png", "does not exist"),
])
def test_unwritable_paths_fail_before_the_run(tmp_path, name, fragment):
    with pytest.raises(InputError, match=fragment):
        check_writable(tmp_path / name)


def test_png_frames_each_view_and_marks_where_crops_meet(tmp_path):
    _, png, row = read_back(tmp_path, layer=1)
    side = GRID * 12  # CELL pixels per merged patch
    x0, y0 = row.cell_box(CROPS_VIEW, 0, 0)[:2]
    assert tuple(png[y0 + 30, x0 + side]) == (120, 170, 255)  # the edge between crop 1 and crop 2
    assert tuple(png[y0 + 30, x0 + side - 6]) != (120, 170, 255)  # a cell centre is never drawn over
    gx, gy = row.cell_box(GLOBAL_VIEW, 0, 0)[:2]
    assert tuple(png[gy - 1, gx + 30]) == tuple(png[y0 - 1, x0 + 30]) == (150, 150, 150)  # frames, just outside


def test_the_figure_is_as_wide_as_the_legend_with_the_familys_separator_names():
    """Gemma 3's separator names are long: the figure widens for the legend that writes them."""
    from hae_cli.model.interface import ImageCells, PictureView

    view, index = [PictureView("view", None, 2, 2)], np.arange(4)
    named = ImageCells(view, np.zeros(4, int), index // 2, index % 2, "<start_of_image> <end_of_image>")
    unnamed = ImageCells(view, np.zeros(4, int), index // 2, index % 2, "")
    assert layout([named]).width > layout([unnamed]).width
