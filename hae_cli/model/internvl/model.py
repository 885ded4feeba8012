"""InternVL (3, transformers' native `internvl`; 3.5's `-hf` repos ship another image processor, not
tried here): an image tiled into a grid of square tiles
chosen by its aspect ratio, then a thumbnail of the whole image, over a Qwen2 / Qwen3 text model."""

from __future__ import annotations

from hae_cli.model.hf import HFVisionLanguageModel, ImageRun
from hae_cli.model.tiled import TiledImages, feature_runs


class InternVL(TiledImages, HFVisionLanguageModel):
    """An image is `<img>`, then `image_seq_length` `<IMG_CONTEXT>` tokens per tile (a square of
    pixel-shuffled patches, row-major), the tiles row by row and then the thumbnail, then
    `</img>`. The grid is GotOcr2's: the tile arrangement (1 to `max_patches` tiles) closest to
    the image's aspect ratio; an image that fits one tile has no thumbnail, its one view being the
    whole image. The thumbnail is the overview (HAE's floor draws on it), as Phi-3.5-V's global
    view; `<img>` and `</img>` are separators. Plain causal attention, one rotary position a token."""

    family = "InternVL"
    model_types = ("internvl",)
    image_tokens = "<img>, tiles then a thumbnail, each image_seq_length tokens (pixel-shuffled patches), </img>"
    overview = "the thumbnail (the whole image when it is one tile)"
    kept_views = "tiles, thumbnail, <img> </img>"
    end_of_turn = ("<|im_end|>",)
    overview_caption = "thumbnail"
    marker_caption = "<img> </img>"
    image_options = {"max_tiles": "most tiles an image is cut into (the thumbnail comes on top)"}

    @classmethod
    def image_option_kwargs(cls, processor, option: str, value: int) -> dict:
        return {"max_patches": value}

    def layout_of(self, run: ImageRun, image_inputs: dict, index: int, count: int, picture) -> dict:
        per_view = self.processor.image_seq_length
        views = sum(1 for t in run.ids if t == self.image_token_id) // per_view
        rows = cols = 0
        if views > 1:
            cols, rows = self.tile_grid(picture.height, picture.width)
            if rows * cols + 1 != views:
                raise RuntimeError(f"{self.family}: {views} views for a {rows} x {cols} grid and its thumbnail")
        return {"tokens": len(run.ids), "tiles": [rows, cols], "tile": round(per_view**0.5),
                "feature_runs": feature_runs([t == self.image_token_id for t in run.ids])}

    def tile_grid(self, height: int, width: int) -> tuple[int, int]:
        """(columns, rows) of tiles the image processor cuts an image of this size into."""
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

        processor = self.processor.image_processor
        size = processor.size
        most = self.processor_kwargs.get("max_patches", processor.max_patches)
        return get_optimal_tiled_canvas((height, width), (size["height"], size["width"]), processor.min_patches, most)
