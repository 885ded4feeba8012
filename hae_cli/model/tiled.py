"""Images cut into a grid of equal tiles and one view of the whole image (its overview): Idefics3 /
SmolVLM (tiles, then the global image), InternVL (tiles, then the thumbnail), Gemma 3 (the image,
then its pan-and-scan crops, where asked for).

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
    """`tag_run` and `image_cells` of a tiles-and-overview layout (a mixin of an `HFVisionLanguageModel`)."""

    overview_caption = "global view"  # what --show-kept calls the view of the whole image
    marker_caption = "markers"  # ... and the tokens around the views
    tiles_caption = "tiles"
    overview_first = False  # the overview before the tiles (Gemma 3), not after them

    def tag_run(self, run: ImageRun, layout: dict) -> tuple[list[int], list[bool]]:
        """Feature tokens are IMAGE, the rest SEPARATOR; the overview view's features are the overview."""
        modality, overview, features = [], [], 0
        for token in run.ids:
            is_feature = token == self.image_token_id
            modality.append(int(Modality.IMAGE if is_feature else Modality.SEPARATOR))
            overview.append(is_feature and self._tile_of(features, layout) is None)
            features += is_feature
        return modality, overview

    def _tile_of(self, feature: int, layout: dict) -> int | None:
        """Which tile the `feature`-th feature of an image belongs to (None: the overview)."""
        tiles = layout["tiles"][0] * layout["tiles"][1]
        tile = feature // layout["tile"] ** 2 - (1 if self.overview_first else 0)
        return tile if 0 <= tile < tiles else None

    def image_cells(self, picture, layout: dict) -> ImageCells:
        rows, cols = layout["tiles"]
        side = layout["tile"]
        per_view = side * side
        views = []
        overview_view = PictureView(self.overview_caption, picture, side, side)
        if self.overview_first:
            views.append(overview_view)
        if rows:
            views.append(PictureView(self.tiles_caption, picture, cols * side, rows * side, (rows, cols)))
        if not self.overview_first:
            views.append(overview_view)
        markers = layout["tokens"] - (rows * cols + 1) * per_view
        across = math.ceil(math.sqrt(markers))  # the markers as a block, not one long row
        views.append(PictureView(self.marker_caption, None, across, math.ceil(markers / across), separator=True))
        view, row, col, feature, marker = [], [], [], 0, 0
        overview_at = 0 if self.overview_first else len(views) - 2
        tiles_at, marker_view = 1 - overview_at if rows else None, len(views) - 1
        is_feature = np.zeros(layout["tokens"], dtype=bool)
        for start, length in layout["feature_runs"]:
            is_feature[start : start + length] = True
        for slot in range(layout["tokens"]):
            if is_feature[slot]:
                tile = self._tile_of(feature, layout)
                r, c = divmod(feature % per_view, side)
                if tile is not None:
                    view.append(tiles_at)
                    row.append(tile // cols * side + r)
                    col.append(tile % cols * side + c)
                else:
                    view.append(overview_at)
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
