"""Qwen2-VL and Qwen2.5-VL: images at their native resolution, one run of merged patches each,
and multimodal rotary positions (three rows: time, height, width)."""

from __future__ import annotations

import torch

from hae_cli.model.hf import HFVisionLanguageModel, ImageRun
from hae_cli.model.interface import ImageCells, PictureView, PromptTokens


class Qwen2VL(HFVisionLanguageModel):
    """An image is `<|vision_start|>`, (h / 2) x (w / 2) `<|image_pad|>` tokens (2 x 2 merged
    patches, row-major), `<|vision_end|>`. It has one view, so HAE's per-image floor draws on the
    whole image. Positions come from the model's own `get_rope_index`: text counts on in all
    three rows, an image's tokens share their time row and repeat their height and width rows."""

    family = "Qwen2-VL"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    image_tokens = "native resolution, 2x2-merged patches between <|vision_start|> and <|vision_end|>; M-RoPE"
    overview = "the whole image (one view)"
    kept_views = "the image at its own resolution"
    end_of_turn = ("<|im_end|>",)
    image_options = {"max_pixels": "most pixels an image is resized to (a token per 2 x 2 patches)"}

    @classmethod
    def image_option_kwargs(cls, processor, option: str, value: int) -> dict:
        return {"size": {"shortest_edge": processor.image_processor.size.shortest_edge, "longest_edge": value}}

    def layer_position_ids(self, position_ids):
        return None  # as Qwen2-VL's text model passes them, given three rows

    def layout_of(self, run: ImageRun, image_inputs: dict, index: int, count: int, picture) -> dict:
        t, h, w = image_inputs["image_grid_thw"][index].tolist()
        merge = self.config.vision_config.spatial_merge_size
        return {"tokens": len(run.ids), "grid": [h // merge, w // merge], "frames": t}

    def prompt_extra(self, ids: list[int], image_inputs: dict, runs: list[ImageRun]) -> dict[str, torch.Tensor]:
        """The rotary positions `[3, L]` of these ids, counted from 0 (`position_ids` shifts them)."""
        input_ids = torch.tensor([ids])
        kwargs = {"mm_token_type_ids": (input_ids == self.image_token_id).long(),
                  "attention_mask": torch.ones_like(input_ids)}
        if "image_grid_thw" in image_inputs:
            kwargs["image_grid_thw"] = image_inputs["image_grid_thw"]
        positions, _ = self.model.model.get_rope_index(input_ids, **kwargs)
        return {"rope": positions[:, 0].cpu()}

    def position_ids(self, tokens: PromptTokens, start: int) -> tuple[torch.Tensor, int]:
        rope = tokens.extra["rope"]
        if not rope.shape[-1]:
            return rope[:, None].to(self.device), start
        shifted = rope - rope[:, 0].min() + start
        return shifted[:, None].to(self.device), int(shifted.max()) + 1

    def decode_position_ids(self, position: int) -> torch.Tensor:
        return torch.full((3, 1, 1), position, device=self.device)

    def image_cells(self, picture, layout: dict) -> ImageCells:
        rows, cols = layout["grid"]
        view = PictureView("the image at its own resolution, 2 x 2 patches a token", picture, cols, rows)
        index = torch.arange(rows * cols)
        return ImageCells([view], torch.zeros_like(index).numpy(), (index // cols).numpy(), (index % cols).numpy())
