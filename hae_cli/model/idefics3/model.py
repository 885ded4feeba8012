"""Idefics3 and SmolVLM: an image split into tiles of `image_seq_len` tokens each, then a global
view of the whole image, each view introduced by its name (`<row_1_col_2>`, `<global-img>`)
between `<fake_token_around_image>` markers."""

from __future__ import annotations

import math
import re

import numpy as np

from hae_cli.cache.modality import Modality
from hae_cli.model.hf import HFVisionLanguageModel, ImageRun
from hae_cli.model.interface import ImageCells, PictureView

_TILE = re.compile(r"<row_(\d+)_col_(\d+)>")


class Idefics3(HFVisionLanguageModel):
    """The tiles come row by row, each a square of `image_seq_len` features (row-major), then the
    global view the same way; the global view is the image's overview (HAE's floor draws on it).
    The markers, view names and line breaks inside an image's run are its separators."""

    family = "Idefics3 / SmolVLM"
    model_types = ("idefics3", "smolvlm")
    image_tokens = "tiles, then a global image, each a square of image_seq_len tokens after <row_i_col_j> / <global-img>"
    overview = "the global image"
    kept_views = "tiles, global view, markers"
    end_of_turn = ("<end_of_utterance>",)

    def text_model(self):
        return self.model.model.text_model

    def layout_of(self, run: ImageRun, image_inputs: dict, index: int, count: int) -> dict:
        tiles = [tuple(map(int, match)) for match in _TILE.findall(run.replacement)]
        rows, cols = (max(r for r, _ in tiles), max(c for _, c in tiles)) if tiles else (0, 0)
        side = math.isqrt(self.processor.image_seq_len)
        return {"tokens": len(run.ids), "tiles": [rows, cols], "tile": side,
                "feature_runs": _runs([t == self.image_token_id for t in run.ids])}

    def tag_run(self, run: ImageRun, layout: dict) -> tuple[list[int], list[bool]]:
        per_view = layout["tile"] ** 2
        global_from = layout["tiles"][0] * layout["tiles"][1] * per_view
        modality, overview, features = [], [], 0
        for token in run.ids:
            is_feature = token == self.image_token_id
            modality.append(int(Modality.IMAGE if is_feature else Modality.SEPARATOR))
            overview.append(is_feature and features >= global_from)
            features += is_feature
        return modality, overview

    def image_cells(self, picture, layout: dict) -> ImageCells:
        rows, cols = layout["tiles"]
        side = layout["tile"]
        per_view = side * side
        views = []
        if rows:
            views.append(PictureView("tiles", picture, cols * side, rows * side, (rows, cols)))
        views.append(PictureView("global view", picture, side, side))
        markers = layout["tokens"] - (rows * cols + 1) * per_view
        across = math.ceil(math.sqrt(markers))  # the markers as a block, not one long row
        views.append(PictureView("markers", None, across, math.ceil(markers / across), separator=True))
        view, row, col, feature, marker = [], [], [], 0, 0
        global_view, marker_view = len(views) - 2, len(views) - 1
        is_feature = np.zeros(layout["tokens"], dtype=bool)
        for start, length in layout["feature_runs"]:
            is_feature[start : start + length] = True
        for slot in range(layout["tokens"]):
            if is_feature[slot]:
                tile, within = divmod(feature, per_view)
                r, c = divmod(within, side)
                if tile < rows * cols:
                    view.append(0)
                    row.append(tile // cols * side + r)
                    col.append(tile % cols * side + c)
                else:
                    view.append(global_view)
                    row.append(r)
                    col.append(c)
                feature += 1
            else:
                view.append(marker_view)
                row.append(marker // across)
                col.append(marker % across)
                marker += 1
        return ImageCells(views, np.array(view), np.array(row), np.array(col), "markers")


def _runs(flags: list[bool]) -> list[list[int]]:
    """[start, length] of each run of True in `flags`."""
    runs, start = [], None
    for i, flag in enumerate([*flags, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append([start, i - start])
            start = None
    return runs
