"""The image embedding: CLIP patch features -> 2x2 merge -> separators -> MLP projection.

The attribute names (`img_processor`, `glb_GN`, `sub_GN`, `img_projection`) follow the
official checkpoint so its keys load one to one (bar CLIP's missing `vision_model` level).
The token order produced here must equal `image.image_token_modalities`; a test checks it.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionModel


class ImageEmbedding(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        merged_dim = 4 * config.image_dim_out
        hidden = config.text.hidden_size
        self.vision_layer_index = config.vision_layer_index
        self.img_processor = CLIPVisionModel(config.vision)
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, merged_dim))
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, merged_dim))
        self.img_projection = nn.Sequential(nn.Linear(merged_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def crop_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP patch features (CLS dropped) from the chosen hidden state, `[crops, patches, C]`."""
        tower = self.img_processor
        dtype = tower.embeddings.patch_embedding.weight.dtype
        hidden = tower.pre_layrnorm(tower.embeddings(pixel_values.to(dtype)))
        # hidden_states[k] is the output of layer k (index 0: the embeddings), so only
        # the layers up to the chosen state need to run.
        num_layers = len(tower.encoder.layers)
        stop = self.vision_layer_index % (num_layers + 1)
        for layer in tower.encoder.layers[:stop]:
            hidden = layer(hidden, None)
        return hidden[:, 1:]

    def forward(self, pixel_values: torch.Tensor, h_crops: int, w_crops: int) -> torch.Tensor:
        """One image's token embeddings: `[tokens, hidden]` in the official sub_glb order.

        `pixel_values` is `[1 + h_crops * w_crops, 3, S, S]`, the global view first.
        """
        return self.project_features(self.crop_features(pixel_values), h_crops, w_crops)

    def project_features(self, features: torch.Tensor, h_crops: int, w_crops: int) -> torch.Tensor:
        """`crop_features` -> the image's token embeddings; apart from `forward` so that a
        trainer can keep the tower frozen and its outputs cached."""
        global_view = _merge_2x2(features[:1], 1, 1)
        crops = _merge_2x2(features[1:], h_crops, w_crops)
        tokens = torch.cat(
            [self._with_row_separators(crops), self.glb_GN[0], self._with_row_separators(global_view)], dim=0
        )
        return self.img_projection(tokens)

    def _with_row_separators(self, grid: torch.Tensor) -> torch.Tensor:
        rows, _, dim = grid.shape
        separators = self.sub_GN[0].expand(rows, 1, dim)
        return torch.cat([grid, separators], dim=1).reshape(-1, dim)


def _merge_2x2(features: torch.Tensor, h_crops: int, w_crops: int) -> torch.Tensor:
    """`[h*w crops, side*side, C]` -> one map `[h*side/2, w*side/2, 4C]`, crops tiled row-major."""
    crops, patches, channels = features.shape
    side = int(round(patches**0.5))
    half = side // 2
    merged = (
        features.reshape(crops, half, 2, half, 2, channels)
        .permute(0, 1, 3, 2, 4, 5)
        .reshape(h_crops, w_crops, half, half, 4 * channels)
        .permute(0, 2, 1, 3, 4)
    )
    return merged.reshape(h_crops * half, w_crops * half, 4 * channels)
