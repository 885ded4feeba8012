"""FastV: after an early layer, drop the visual tokens the last token barely attends to."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from hae_cli.cache.attention import AttentionRequest
from hae_cli.cache.indices import complement
from hae_cli.cache.modality import Modality
from hae_cli.cache.policies.base import Policy, PrefillKeep, Rows, check_float, check_int, check_layer, param


@dataclass
class FastVPolicy(Policy):
    """FastV, "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference
    Acceleration for Large Vision-Language Models", https://arxiv.org/abs/2403.06764.

    Layers before `prune_layer` see every token. At the layer just before it, the attention
    of the last prompt token ranks the image tokens; the lowest `drop_ratio` of them are
    pruned from the hidden states, so layers from `prune_layer` on never compute them (and
    never cache them). Earlier layers keep their full cache, as in FastV. No decode eviction.
    """

    name: ClassVar[str] = "fastv"

    prune_layer: int = param(2, "K, the first layer that does not see the dropped tokens (paper: K = 2).")
    drop_ratio: float = param(0.5, "R, the fraction of image tokens dropped (paper: 50%).")

    def __post_init__(self) -> None:
        check_int("prune_layer", self.prune_layer, 1)
        check_float("drop_ratio", self.drop_ratio, 0.0, 1.0)

    def bind(self, num_layers: int) -> None:
        check_layer("prune_layer", self.prune_layer, 1, num_layers)

    def prefill_requests(self, layer_idx: int, rows: Rows) -> dict[str, AttentionRequest]:
        if layer_idx != self.prune_layer - 1:
            return {}
        image = (rows.modality == Modality.IMAGE).nonzero().squeeze(-1)
        if image.numel() == 0:
            return {}
        return {"last_token": AttentionRequest(rows=torch.tensor([len(rows) - 1]), cols=rows.past + image)}

    def prefill_keep(self, layer_idx, rows, attention) -> PrefillKeep | None:
        summary = attention.get("last_token")
        if summary is None:
            return None
        image = (rows.modality == Modality.IMAGE).nonzero().squeeze(-1)
        n_drop = math.floor(self.drop_ratio * image.numel())
        if n_drop == 0:
            return None
        ranked = summary.sum.mean(dim=0)  # [N_image], averaged over heads
        dropped = image[ranked.topk(n_drop, largest=False).indices.to(image.device)]
        return PrefillKeep(complement(dropped, len(rows)), layers=(), broadcast=True)
