"""Phi-3.5-Vision from native parts: transformers' Phi3ForCausalLM plus our image embedding.

The image embedding is attached at `model.vision_embed_tokens`, so `language_model`'s
state dict has exactly the official key names (`model.layers.N...`, `lm_head.weight`,
`model.vision_embed_tokens...`), and `language_model.generate` still works on text.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Phi3ForCausalLM

from hae_cli.cache.attention import register_attention
from hae_cli.model.decoder import DecoderOutput, TextBackbone, run_decoder
from hae_cli.model.phi3v.config import ModelConfig
from hae_cli.model.phi3v.vision import ImageEmbedding


class Phi3VForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        register_attention()  # the config asks for "hae_sdpa"
        self.config = config
        self.language_model = Phi3ForCausalLM(config.text)
        self.language_model.model.vision_embed_tokens = ImageEmbedding(config)

    @property
    def vision(self) -> ImageEmbedding:
        return self.language_model.model.vision_embed_tokens

    @property
    def device(self) -> torch.device:
        return self.language_model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.lm_head.weight.dtype

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters under their official checkpoint names."""
        return {to_official_key(k): v for k, v in self.language_model.state_dict().items()}

    def image_embeddings(self, images) -> list[torch.Tensor]:
        """`[tokens, hidden]` per `ProcessedImage`, in order."""
        return [
            self.vision(image.pixel_values.to(self.device), image.h_crops, image.w_crops) for image in images
        ]

    def embed(self, prompt, images, image_features: list[torch.Tensor] | None = None, first_image: int = 1) -> torch.Tensor:
        """Token embeddings with image k's features at the `-k` slots: `[1, L, hidden]`.

        `image_features` (from `image_embeddings`) skips the vision tower, for callers that ask
        several questions about one image. `first_image`: the number of `images[0]` (a later
        turn of a conversation continues the count).
        """
        ids = prompt.input_ids.to(self.device)
        text_rows = ids >= 0
        embeds = self.language_model.model.embed_tokens(ids.clamp(min=0))
        if images:
            features = image_features if image_features is not None else self.image_embeddings(images)
            for k, image_features in enumerate(features, start=first_image):
                slots = (ids == -k).nonzero().squeeze(-1)
                if slots.numel() != image_features.shape[0]:
                    raise ValueError(f"image {k}: {slots.numel()} slots for {image_features.shape[0]} features")
                embeds = embeds.index_copy(0, slots, image_features.to(embeds.dtype))
        elif not bool(text_rows.all()):
            raise ValueError("prompt has image slots but no images were given")
        return embeds.unsqueeze(0)

    @property
    def backbone(self) -> TextBackbone:
        return TextBackbone.of_causal_lm(self.language_model)

    def forward_embeds(self, inputs_embeds, position_ids, cache=None, attention_mask=None, logits_rows=1) -> DecoderOutput:
        return run_decoder(self.backbone, inputs_embeds, position_ids, cache, attention_mask, logits_rows)


# transformers 5.x's CLIPVisionModel has no `vision_model` level; the official keys do.
_CLIP_OFFICIAL = "model.vision_embed_tokens.img_processor.vision_model."
_CLIP_OURS = "model.vision_embed_tokens.img_processor."


def to_official_key(key: str) -> str:
    return key.replace(_CLIP_OURS, _CLIP_OFFICIAL, 1) if key.startswith(_CLIP_OURS) else key


def from_official_key(key: str) -> str:
    return key.replace(_CLIP_OFFICIAL, _CLIP_OURS, 1) if key.startswith(_CLIP_OFFICIAL) else key
