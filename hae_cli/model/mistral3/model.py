"""Mistral 3 (Mistral-Small-3.1 / 3.2: a Pixtral vision tower, a 2 x 2 patch merger, a Mistral text
model): an image at its own resolution, one run of `[IMG]` tokens row by row, each row closed by
`[IMG_BREAK]` and the last by `[IMG_END]`."""

from __future__ import annotations

import numpy as np

from hae_cli.model.hf import HFVisionLanguageModel, ImageRun
from hae_cli.model.interface import ImageCells, PictureView


class Mistral3(HFVisionLanguageModel):
    """An image is resized to fit the processor's `longest_edge` in whole merged patches and
    becomes rows of `[IMG]` features, each row ended by `[IMG_BREAK]` (the last by `[IMG_END]`):
    the separators, as Phi-3.5-V's `sub_GN`; only `[IMG]` slots receive features. There is no
    overview: HAE's floor draws on the whole image. `image_sizes` travels with the pixels."""

    family = "Mistral 3"
    model_types = ("mistral3",)
    image_tokens = "native resolution, rows of merged-patch [IMG] tokens, each ended by [IMG_BREAK], the last by [IMG_END]"
    overview = "the whole image (one view)"
    kept_views = "the image at its own resolution, with its row breaks"
    image_options = {"longest_edge": "longest image side in pixels (a token per 28 x 28)"}

    @classmethod
    def image_option_kwargs(cls, processor, option: str, value: int) -> dict:
        return {"size": {"longest_edge": value}}

    def layout_of(self, run: ImageRun, image_inputs: dict, index: int, count: int, picture) -> dict:
        features = sum(1 for t in run.ids if t == self.image_token_id)
        rows = len(run.ids) - features
        if rows == 0 or features % rows:
            raise RuntimeError(f"{self.family}: {features} features in {rows} rows")
        return {"tokens": len(run.ids), "grid": [rows, features // rows]}

    def image_cells(self, picture, layout: dict) -> ImageCells:
        rows, cols = layout["grid"]
        view = PictureView("the image at its own resolution ([IMG_BREAK] ends each row)", picture, cols, rows,
                           row_separators=True)
        cells = np.arange(rows * (cols + 1))
        return ImageCells([view], np.zeros_like(cells), cells // (cols + 1), cells % (cols + 1), "[IMG_BREAK] [IMG_END]")
