"""Qwen3-VL: Qwen2-VL's layout (native resolution, one run of merged patches, multimodal rotary
positions, interleaved here), plus deepstack: features from early vision blocks added to the
hidden states of the first text layers at the image's slots."""

from __future__ import annotations

import torch

from hae_cli.model.interface import PromptTokens
from hae_cli.model.qwen2_vl.model import Qwen2VL


class Qwen3VL(Qwen2VL):
    """An image is `<|vision_start|>`, (h / 2) x (w / 2) `<|image_pad|>` tokens (2 x 2 merged 16-pixel
    patches, row-major), `<|vision_end|>`; positions from the model's own `get_rope_index`, an
    image advancing them by max(h, w) / 2. The vision tower also gives one feature per slot for
    each of its deepstack blocks, added after text layer 0, 1, ...: `embed` keeps them with the
    prompt's rows (`extra["deepstack"]`, sliced and pruned with them), `layer_additions` hands
    them to the walk. A layer's image K/V therefore depends on them, not on the input alone."""

    family = "Qwen3-VL"
    model_types = ("qwen3_vl", "qwen3_vl_moe")  # the same walk: the MoE's experts sit inside its layers
    image_tokens = "native resolution, 2x2-merged patches between <|vision_start|> and <|vision_end|>; M-RoPE; deepstack"

    def vision_features(self, output) -> torch.Tensor:
        """Each slot's feature, then its deepstack features, side by side: `[slots, hidden x (1 + n)]`."""
        parts = [output.pooler_output, *output.deepstack_features]
        return torch.cat([torch.cat([f.reshape(-1, f.shape[-1]) for f in part]) for part in parts], dim=-1)

    def embed(self, tokens: PromptTokens, images: list, features: list[torch.Tensor] | None = None,
              first_image: int = 1) -> torch.Tensor:
        slots = tokens.input_ids == self.image_token_id
        if bool(slots.any()) and images:
            features = features if features is not None else self.image_features(images)
            hidden = self.text_config.hidden_size
            stacked = torch.cat(list(features))
            deep = stacked[:, hidden:].reshape(stacked.shape[0], -1, hidden)  # [slots, n, hidden]
            additions = deep.new_zeros(deep.shape[1], hidden, len(tokens))
            additions[..., slots.to(deep.device)] = deep.permute(1, 2, 0)
            tokens.extra["deepstack"] = additions
            features = list(stacked[:, :hidden].split([f.shape[0] for f in features]))
        return super().embed(tokens, images, features, first_image)

    def layer_additions(self, tokens: PromptTokens) -> dict[int, torch.Tensor] | None:
        deep = tokens.extra.get("deepstack")
        if deep is None:
            return None
        return {layer: deep[layer].T[None] for layer in range(deep.shape[0])}
