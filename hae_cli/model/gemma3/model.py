"""Gemma 3: a SigLIP image pooled to a fixed square of soft tokens between `<start_of_image>` and
`<end_of_image>`, over a text model whose sliding-window layers and global layers interleave."""

from __future__ import annotations

import math

from hae_cli.errors import CheckpointError
from hae_cli.model.decoder import LayerRule
from hae_cli.model.hf import HFVisionLanguageModel, ImageRun
from hae_cli.model.tiled import TiledImages, feature_runs

SLIDING = "sliding_attention"


class Gemma3(TiledImages, HFVisionLanguageModel):
    """The template's `<start_of_image>` becomes a blank line, `<start_of_image>`, `mm_tokens_per_image`
    `<image_soft_token>` slots (the image resized whole, pooled, row-major), `<end_of_image>` and a
    blank line: one view, so HAE's floor draws on the whole image; the rest are separators. With
    pan and scan (`pan_and_scan_crops`), a long image's crops follow, each the same way after a
    sentence saying so: the whole image is then the overview, and each crop its own image block.
    Each decoder layer is a sliding one (it sees the last `sliding_window` tokens: the cache
    keeps no more) or a global one, each kind with its own rotary embedding; at a forward that
    carries an image, its soft tokens see each other both ways (transformers' `token_type_ids`).
    Text embeddings are scaled by sqrt(hidden) inside the embedding, image features are not."""

    family = "Gemma 3"
    model_types = ("gemma3",)
    image_tokens = "a fixed square of pooled soft tokens between <start_of_image> and <end_of_image>"
    overview = "the whole image (one view)"
    kept_views = "the image as the tower saw it (resized square), markers"
    end_of_turn = ("<end_of_turn>",)
    overview_caption = "the image (resized square)"
    marker_caption = "<start_of_image> <end_of_image>"
    tiles_caption = "pan-and-scan crops"
    overview_first = True
    image_options = {"pan_and_scan_crops": "pan and scan: most crops of a long image, after the whole (off by default)"}

    @classmethod
    def image_option_kwargs(cls, processor, option: str, value: int) -> dict:
        return {"do_pan_and_scan": True, "pan_and_scan_max_num_crops": value}

    def __init__(self, model, processor, folder, name: str) -> None:
        if model.config.get_text_config().final_logit_softcapping is not None:
            raise CheckpointError(f"{folder}: final_logit_softcapping is not supported (Gemma 3 has none)")
        super().__init__(model, processor, folder, name)

    def layer_rules(self) -> list[LayerRule]:
        config = self.model.config.get_text_config()
        return [LayerRule(rotary=kind, window=config.sliding_window if kind == SLIDING else None, image_blocks=True)
                for kind in config.layer_types]

    def feature_token_id(self) -> int:
        return self.tokenizer.image_token_id

    def layout_of(self, run: ImageRun, image_inputs: dict, index: int, count: int, picture) -> dict:
        """The whole image, then (pan and scan) crops side by side along its longer side."""
        flags = [t == self.image_token_id for t in run.ids]
        per_view = self.config.mm_tokens_per_image
        crops = sum(flags) // per_view - 1
        tiles = [0, 0] if not crops else [1, crops] if picture.width >= picture.height else [crops, 1]
        return {"tokens": len(run.ids), "tiles": tiles, "tile": math.isqrt(per_view), "feature_runs": feature_runs(flags)}
