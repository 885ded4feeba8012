"""The decoder loop, written out so that a cache can prune tokens between layers.

transformers' text models run every layer on the same rows. Index broadcasting drops visual
tokens after the scoring layer so later layers never compute them; that needs a hook between
layers, so the native layers are run here, one by one. Any family whose text model has the
usual transformers shape (decoder layers, a rotary embedding, a final norm, an LM head) walks
through this one function: rotary position ids of any shape work, as long as the sequence is
their last dimension (Phi-3's `[1, L]`, Qwen2-VL's multimodal `[3, 1, L]`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class DecoderOutput:
    logits: torch.Tensor  # [1, rows, vocab] for the last `logits_rows` rows that survived
    kept_rows: torch.Tensor  # indices (into the input rows) that reached the last layer
    hidden_lengths: list[int] = field(default_factory=list)  # rows computed by each layer


@dataclass
class TextBackbone:
    """The parts of a text decoder the walk needs. `layer_position_ids` maps the rotary position
    ids to what the layers take as `position_ids` (the same, unless a family says otherwise)."""

    layers: nn.ModuleList
    rotary_emb: nn.Module
    norm: nn.Module
    lm_head: nn.Module
    embed_tokens: nn.Module
    layer_position_ids: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda ids: ids)

    @classmethod
    def of_causal_lm(cls, lm) -> "TextBackbone":
        """A transformers `*ForCausalLM` (`lm.model.layers`, ..., `lm.lm_head`)."""
        inner = lm.model
        return cls(inner.layers, inner.rotary_emb, inner.norm, lm.lm_head, inner.embed_tokens)


def run_decoder(
    backbone,
    inputs_embeds: torch.Tensor,
    position_ids: torch.Tensor,
    cache=None,
    attention_mask: torch.Tensor | None = None,
    logits_rows: int | None = 1,
) -> DecoderOutput:
    """Run the decoder on embeddings with explicit rotary position ids (sequence last; a 1-D
    `[L]` is read as `[1, L]`).

    `backbone`: a `TextBackbone`, or a transformers `*ForCausalLM`. `cache` may be any
    transformers `Cache`. If it has `after_layer(layer_idx, hidden)`, a returned index tensor
    prunes the rows (and positions, and mask) seen by later layers. `attention_mask`, when
    given, is a bool `[1, 1, q, kv]` (True = attend) for tests that compare eviction against
    masking; otherwise prefill is causal and decode attends all. `logits_rows=None` returns
    logits for every surviving row.
    """
    if not isinstance(backbone, TextBackbone):
        backbone = TextBackbone.of_causal_lm(backbone)
    if inputs_embeds.shape[0] != 1:
        raise ValueError("hae runs one sequence at a time (batch size 1)")
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    hidden = inputs_embeds
    cos, sin = backbone.rotary_emb(hidden, position_ids=position_ids)
    kept_rows = torch.arange(hidden.shape[1], device=hidden.device)
    after_layer = getattr(cache, "after_layer", None)
    hidden_lengths = []
    for layer_idx, decoder_layer in enumerate(backbone.layers):
        hidden_lengths.append(hidden.shape[1])
        hidden = decoder_layer(
            hidden,
            attention_mask=attention_mask if attention_mask is not None else _chunk_mask(cache, layer_idx, hidden),
            position_ids=backbone.layer_position_ids(position_ids),
            cache=cache,
            use_cache=cache is not None,
            position_embeddings=(cos, sin),
        )
        keep = after_layer(layer_idx, hidden) if after_layer is not None else None
        if keep is not None:
            keep = keep.to(hidden.device)
            hidden = hidden[:, keep]
            position_ids = position_ids[..., keep]
            cos, sin = cos[..., keep, :], sin[..., keep, :]
            kept_rows = kept_rows[keep]
            if attention_mask is not None:
                attention_mask = _prune_mask(attention_mask, keep)
    hidden = backbone.norm(hidden)
    if logits_rows is not None:
        hidden = hidden[:, -logits_rows:]
    return DecoderOutput(backbone.lm_head(hidden), kept_rows, hidden_lengths)


def _chunk_mask(cache, layer_idx: int, hidden: torch.Tensor) -> torch.Tensor | None:
    """A causal mask for several new tokens on top of held ones, sized for this layer.

    Without a mask, transformers' SDPA path assumes an empty cache when q > 1 and cuts the
    keys to the first q. Layers may hold different counts after eviction, hence per layer.
    """
    q_len = hidden.shape[1]
    if cache is None or q_len == 1:
        return None
    past = cache.get_seq_length(layer_idx) if layer_idx < len(cache.layers) else 0
    if past == 0:
        return None  # plain prefill: SDPA's is_causal is right and fastest
    new = torch.ones(q_len, q_len, dtype=torch.bool, device=hidden.device).tril()
    held = torch.ones(q_len, past, dtype=torch.bool, device=hidden.device)
    return torch.cat([held, new], dim=1)[None, None]


def _prune_mask(mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Drop pruned query rows and the matching new-token columns (past columns stay)."""
    q_len, kv_len = mask.shape[-2], mask.shape[-1]
    past = kv_len - q_len
    columns = torch.cat([torch.arange(past, device=mask.device), past + keep])
    return mask[..., keep, :][..., columns]


def static_decode_step(backbone: TextBackbone, ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       position_ids: torch.Tensor, step) -> torch.Tensor:
    """One generated token (`ids` `[1, 1]`, its rotary `cos`/`sin` and position ids) through every
    layer over a `StaticStep`'s fixed-shape storage; the next logits `[vocab]`. Every shape is
    fixed between eviction rounds and nothing returns to Python: what `torch.compile` captures."""
    hidden = backbone.embed_tokens(ids)
    layer_position_ids = backbone.layer_position_ids(position_ids)
    for layer_idx, decoder_layer in enumerate(backbone.layers):
        hidden = decoder_layer(
            hidden,
            attention_mask=step.attention_mask(layer_idx),
            position_ids=layer_position_ids,
            cache=step,
            use_cache=True,
            position_embeddings=(cos, sin),
            hae_step=step,
        )
    return backbone.lm_head(backbone.norm(hidden))[0, -1]
