"""The LLaVA family: LLaVA-1.5 (one fixed grid per image), LLaVA-NeXT and LLaVA-OneVision (a
base view of the whole image, then "anyres" crops stitched and unpadded, a newline token closing
each row of crop features)."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from hae_cli.cache.modality import Modality
from hae_cli.model.hf import HFVisionLanguageModel, ImageRun
from hae_cli.model.interface import ImageCells, PictureView


class Llava(HFVisionLanguageModel):
    """LLaVA-1.5: each image is `image_seq_length` `<image>` tokens, a square grid of CLIP patches
    (the image resized and centre-cropped to the tower's size). One view: HAE's per-image floor
    draws on the whole image. The chat template writes a message's images before its text, so a
    labelled turn's "Image k:" labels follow the images, in their order."""

    family = "LLaVA-1.5"
    model_types = ("llava",)
    image_tokens = "one fixed square grid of CLIP patches (24 x 24 on the real model)"
    overview = "the whole image (one view)"
    kept_views = "the image as CLIP saw it (centre crop)"

    def layout_of(self, run: ImageRun, image_inputs: dict, index: int, count: int, picture) -> dict:
        return {"tokens": len(run.ids), "grid": math.isqrt(len(run.ids))}

    def image_cells(self, picture, layout: dict) -> ImageCells:
        side = layout["grid"]
        view = PictureView("the image as CLIP saw it (centre crop)", _centre_square(picture), side, side)
        index = np.arange(side * side)
        return ImageCells([view], np.zeros_like(index), index // side, index % side)


class LlavaNext(HFVisionLanguageModel):
    """LLaVA-NeXT: each image's run is its base view (side x side, the image resized whole), then
    its anyres crops stitched and unpadded to the image's aspect ratio, `width` features a row,
    each row closed by the learnt newline. The base view is the image's overview (HAE's floor
    draws on it); the newlines are separators."""

    family = "LLaVA-NeXT"
    model_types = ("llava_next",)
    image_tokens = "a base view, then anyres crops stitched and unpadded, a newline closing each row"
    overview = "the base view"
    kept_views = "base view, anyres crops with their newlines"
    end_of_turn = ("</s>",)

    def _side(self) -> int:
        vision = self.config.vision_config
        return vision.image_size // vision.patch_size

    def base_only(self, count: int) -> bool:
        """Whether an image among `count` in a prompt is its base view alone."""
        return False

    def layout_of(self, run: ImageRun, image_inputs: dict, index: int, count: int, picture) -> dict:
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        side = self._side()
        layout = {"tokens": len(run.ids), "base": side, "crops": None}
        if self.base_only(count):
            return layout
        size = image_inputs["image_sizes"][index].tolist()
        tiles_h, tiles_w = get_anyres_image_grid_shape(size, self.config.image_grid_pinpoints,
                                                       self.config.vision_config.image_size)
        height, width = unpad_image(torch.empty(1, tiles_h * side, tiles_w * side), size).shape[1:]
        height, width = self.shrink(height, width, side)
        layout["crops"] = [height, width]
        return layout

    def shrink(self, height: int, width: int, side: int) -> tuple[int, int]:
        return height, width

    def tag_run(self, run: ImageRun, layout: dict) -> tuple[list[int], list[bool]]:
        base = layout["base"] ** 2
        image, separator = int(Modality.IMAGE), int(Modality.SEPARATOR)
        modality, overview = [image] * base, [True] * base
        if layout["crops"] is None:  # the base view and one newline
            return modality + [separator], overview + [False]
        height, width = layout["crops"]
        for _ in range(height):
            modality += [image] * width + [separator]
            overview += [False] * (width + 1)
        if len(modality) != len(run.ids):
            raise RuntimeError(f"{self.family}: {len(run.ids)} tokens for an image laid out as {layout}")
        return modality, overview

    def image_cells(self, picture, layout: dict) -> ImageCells:
        side = layout["base"]
        base = PictureView("base view (the whole image)", picture.resize((side * 28, side * 28)), side, side)
        index = np.arange(side * side)
        views, view, row, col = [base], [np.zeros_like(index)], [index // side], [index % side]
        if layout["crops"] is None:
            views.append(PictureView("newline", None, 1, 1, separator=True))
            view, row, col = view + [np.ones(1, int)], row + [np.zeros(1, int)], col + [np.zeros(1, int)]
        else:
            height, width = layout["crops"]
            views.append(PictureView("anyres crops, unpadded (a newline ends each row)", picture, width, height,
                                     row_separators=True))
            cells = np.arange(height * (width + 1))
            view, row, col = view + [np.ones_like(cells)], row + [cells // (width + 1)], col + [cells % (width + 1)]
        return ImageCells(views, np.concatenate(view), np.concatenate(row), np.concatenate(col), "newline")


class LlavaOnevision(LlavaNext):
    """LLaVA-OneVision: as LLaVA-NeXT, the crops shrunk to about `anyres_max_N` tiles' worth; with
    two or more images in one prompt, each is its base view and one newline."""

    family = "LLaVA-OneVision"
    model_types = ("llava_onevision",)
    image_tokens = "as LLaVA-NeXT (crops pooled to about 9 tiles); with 2+ images, each its base view and a newline"
    overview = "the base view"
    kept_views = "base view, anyres crops (one image) or the newline (several)"
    end_of_turn = ("<|im_end|>",)

    def base_only(self, count: int) -> bool:
        return count > 1

    def shrink(self, height: int, width: int, side: int) -> tuple[int, int]:
        aspect = getattr(self.config, "vision_aspect_ratio", None)
        if not aspect:
            return height, width
        ratio = math.sqrt(height * width / (int(aspect.removeprefix("anyres_max_")) * side**2))
        return (int(height // ratio), int(width // ratio)) if ratio > 1.1 else (height, width)


def _centre_square(picture: Image.Image) -> Image.Image:
    side = min(picture.size)
    left, top = (picture.width - side) // 2, (picture.height - side) // 2
    return picture.crop((left, top, left + side, top + side))
