"""Images cut into a grid of equal tiles followed by one view of the whole image (its overview):
Idefics3 / SmolVLM (tiles, then the global image), InternVL (tiles, then the thumbnail).

A family's `layout_of` says `tiles` ([rows, cols]; [0, 0] when the whole image is one view),
`tile` (a view's side in tokens: each view is a square run, row-major), `tokens` and
`feature_runs` (where the feature tokens sit in the run; the rest are markers). These two
methods then tag the run and draw its views.
"""

from __future__ import annotations

import math

import numpy as np

from hae_cli.cache.modality import Modality
from hae_cli.model.hf import ImageRun
from hae_cli.model.interface import ImageCells, PictureView


class TiledImages:
    """`tag_run` and `image_cells` of a tiles-then-overview layout (a mixin of an `HFVisionLanguageModel`)."""

    overview_caption = "global view"  # what --show-kept calls the view of the whole image
    marker_caption = "markers"  # ... and the tokens around the views

    def tag_run(self, run: ImageRun, layout: dict) -> tuple[list[int], list[bool]]:
        """Feature tokens are IMAGE, the rest SEPARATOR; the last view's features are the overview."""
        per_view = layout["tile"] ** 2
        overview_from = layout["tiles"][0] * layout["tiles"][1] * per_view
        modality, overview, features = [], [], 0
        for token in run.ids:
            is_feature = token == self.image_token_id
            modality.append(int(Modality.IMAGE if is_feature else Modality.SEPARATOR))
            overview.append(is_feature and features >= overview_from)
            features += is_feature
        return modality, overview

    def image_cells(self, picture, layout: dict) -> ImageCells:
        rows, cols = layout["tiles"]
        side = layout["tile"]
        per_view = side * side
        views = []
        if rows:
            views.append(PictureView("tiles", picture, cols * side, rows * side, (rows, cols)))
        views.append(PictureView(self.overview_caption, picture, side, side))
        markers = layout["tokens"] - (rows * cols + 1) * per_view
        across = math.ceil(math.sqrt(markers))  # the markers as a block, not one long row
        views.append(PictureView(self.marker_caption, None, across, math.ceil(markers / across), separator=True))
        view, row, col, feature, marker = [], [], [], 0, 0
        overview_view, marker_view = len(views) - 2, len(views) - 1
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
                    view.append(overview_view)
                    row.append(r)
                    col.append(c)
                feature += 1
            else:
                view.append(marker_view)
                row.append(marker // across)
                col.append(marker % across)
                marker += 1
        return ImageCells(views, np.array(view), np.array(row), np.array(col), self.marker_caption)


def feature_runs(flags: list[bool]) -> list[list[int]]:
    """[start, length] of each run of True in `flags`."""
    runs, start = [], None
    for i, flag in enumerate([*flags, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append([start, i - start])
            start = None
    return runs
