"""Idefics3 and SmolVLM: an image split into tiles of `image_seq_len` tokens each, then a global
view of the whole image, each view introduced by its name (`<row_1_col_2>`, `<global-img>`)
between `<fake_token_around_image>` markers."""

from __future__ import annotations

import math
import re

from hae_cli.model.hf import HFVisionLanguageModel, ImageRun
from hae_cli.model.tiled import TiledImages, feature_runs

_TILE = re.compile(r"<row_(\d+)_col_(\d+)>")


class Idefics3(TiledImages, HFVisionLanguageModel):
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

    def layout_of(self, run: ImageRun, image_inputs: dict, index: int, count: int, picture) -> dict:
        tiles = [tuple(map(int, match)) for match in _TILE.findall(run.replacement)]
        rows, cols = (max(r for r, _ in tiles), max(c for _, c in tiles)) if tiles else (0, 0)
        side = math.isqrt(self.processor.image_seq_len)
        return {"tokens": len(run.ids), "tiles": [rows, cols], "tile": side,
                "feature_runs": feature_runs([t == self.image_token_id for t in run.ids])}
