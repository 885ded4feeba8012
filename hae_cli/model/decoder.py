"""The decoder loop, written out so that a cache can prune tokens between layers.

transformers' text models run every layer on the same rows. Index broadcasting drops visual
tokens after the scoring layer so later layers never compute them; that needs a hook between
layers, so the native layers are run here, one by one. Any family whose text model has the
usual transformers shape (decoder layers, a rotary embedding, a final norm, an LM head) walks
through this one function: rotary position ids of any shape work, as long as the sequence is
their last dimension (Phi-3's `[1, L]`, Qwen2-VL's multimodal `[3, 1, L]`).

Layers need not all follow the same rules: a backbone may say, per layer (`LayerRule`), which
rotary embedding it takes, whether it sees only a sliding window of the last W tokens, and
whether an image's tokens fed together see each other both ways (Gemma 3's prefill). A
forward may also add something to given layers' outputs (Qwen3-VL's deepstack features):
`additions`, pruned with the rows. The cache learns each layer's window from here
(`set_windows`) and never holds more than it needs.
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


@dataclass(frozen=True)
class LayerRule:
    """How one layer attends. `rotary`: the name its backbone's rotary embedding is called with
    (Gemma 3's `"sliding_attention"`; None: the one embedding, called without a name).
    `window`: it sees only the last `window` tokens, itself included (transformers'
    `sliding_window`), counted in feed order. `image_blocks`: the tokens of one image fed in one
    forward see each other both ways (the rest stays causal)."""

    rotary: str | None = None
    window: int | None = None
    image_blocks: bool = False


PLAIN = LayerRule()


@dataclass
class TextBackbone:
    """The parts of a text decoder the walk needs. `layer_position_ids` maps the rotary position
    ids to what the layers take as `position_ids` (the same, unless a family says otherwise).
    `rules`: one `LayerRule` per layer (None: every layer causal, the one rotary embedding)."""

    layers: nn.ModuleList
    rotary_emb: nn.Module
    norm: nn.Module
    lm_head: nn.Module
    embed_tokens: nn.Module
    layer_position_ids: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda ids: ids)
    rules: list[LayerRule] | None = None

    def rule(self, layer_idx: int) -> LayerRule:
        return PLAIN if self.rules is None else self.rules[layer_idx]

    def sees_image_blocks(self) -> bool:
        """Whether any layer lets an image's tokens see each other both ways."""
        return self.rules is not None and any(rule.image_blocks for rule in self.rules)

    def windows(self) -> list[int | None]:
        """Each layer's sliding window (None: it sees every token)."""
        return [self.rule(i).window for i in range(len(self.layers))]

    def rotary_by_kind(self, probe: torch.Tensor, position_ids: torch.Tensor) -> dict:
        """(cos, sin) of each kind of rotary embedding the layers use (`LayerRule.rotary`)."""
        kinds = {self.rule(i).rotary for i in range(len(self.layers))}
        return {kind: self.rotary_emb(probe, position_ids=position_ids) if kind is None
                else self.rotary_emb(probe, position_ids, kind) for kind in kinds}

    def position_embeddings(self, probe: torch.Tensor, position_ids: torch.Tensor) -> list[tuple]:
        """(cos, sin) for each layer, each kind computed once."""
        kinds = self.rotary_by_kind(probe, position_ids)
        return [kinds[self.rule(i).rotary] for i in range(len(self.layers))]

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
    *,
    image_blocks: torch.Tensor | None = None,
    additions: dict[int, torch.Tensor] | None = None,
) -> DecoderOutput:
    """Run the decoder on embeddings with explicit rotary position ids (sequence last; a 1-D
    `[L]` is read as `[1, L]`).

    `backbone`: a `TextBackbone`, or a transformers `*ForCausalLM`. `cache` may be any
    transformers `Cache`. If it has `after_layer(layer_idx, hidden)`, a returned index tensor
    prunes the rows (and positions, and mask) seen by later layers. `attention_mask`, when
    given, is a bool `[1, 1, q, kv]` (True = attend) for tests that compare eviction against
    masking; otherwise each layer's mask follows its rule (plain: prefill causal, decode
    attends all). `image_blocks` `[L]`: rows with the same value >= 0 are one image's tokens
    (for layers whose rule says `image_blocks`). `additions`: layer index -> `[1, L, hidden]`
    added to that layer's output. `logits_rows=None` returns logits for every surviving row.
    """
    if not isinstance(backbone, TextBackbone):
        backbone = TextBackbone.of_causal_lm(backbone)
    if inputs_embeds.shape[0] != 1:
        raise ValueError("hae runs one sequence at a time (batch size 1)")
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    hidden = inputs_embeds
    embeddings = backbone.rotary_by_kind(hidden, position_ids)
    kept_rows = torch.arange(hidden.shape[1], device=hidden.device)
    after_layer = getattr(cache, "after_layer", None)
    windows = backbone.windows()
    if any(windows) and hasattr(cache, "set_windows"):
        cache.set_windows(windows)
    # One new token over a cache that keeps each layer to its window (ours trims it at every step's
    # end) sees every held row: no mask to build, and no host sync for it at each decode step.
    plain = backbone.rules is None or (hidden.shape[1] == 1 and hasattr(cache, "set_windows"))
    fed = None if plain else _fed_index(cache, hidden.shape[1], hidden.device)
    hidden_lengths = []
    for layer_idx, decoder_layer in enumerate(backbone.layers):
        hidden_lengths.append(hidden.shape[1])
        if attention_mask is not None:
            mask = attention_mask
        elif plain:
            mask = _chunk_mask(cache, layer_idx, hidden)
        else:
            blocks = None if image_blocks is None else image_blocks.to(hidden.device)[kept_rows]
            mask = rule_mask(backbone.rule(layer_idx), fed[kept_rows], _held_index(cache, layer_idx, fed),
                             blocks, _query_groups(decoder_layer))
        hidden = decoder_layer(
            hidden,
            attention_mask=mask,
            position_ids=backbone.layer_position_ids(position_ids),
            cache=cache,
            use_cache=cache is not None,
            position_embeddings=embeddings[backbone.rule(layer_idx).rotary],
        )
        if additions is not None and layer_idx in additions:
            hidden = hidden + additions[layer_idx].to(hidden.device, hidden.dtype)[:, kept_rows]
        keep = after_layer(layer_idx, hidden) if after_layer is not None else None
        if keep is not None:
            keep = keep.to(hidden.device)
            hidden = hidden[:, keep]
            position_ids = position_ids[..., keep]
            embeddings = {kind: (cos[..., keep, :], sin[..., keep, :]) for kind, (cos, sin) in embeddings.items()}
            kept_rows = kept_rows[keep]
            if attention_mask is not None:
                attention_mask = _prune_mask(attention_mask, keep)
    hidden = backbone.norm(hidden)
    if logits_rows is not None:
        hidden = hidden[:, -logits_rows:]
    return DecoderOutput(backbone.lm_head(hidden), kept_rows, hidden_lengths)


def rule_mask(rule: LayerRule, query_index: torch.Tensor, held_index: torch.Tensor, blocks: torch.Tensor | None,
              groups: int = 1) -> torch.Tensor | None:
    """A layer's bool mask `[1, 1 or H_q, q, held + q]` (True = attend), or None where SDPA's own
    causal default is right. Tokens are known by their index in feed order: `query_index` `[q]`
    (this forward's rows, which are also the new key columns), `held_index` `[1 or H_kv, held]`
    (the rows the layer already holds, per key head where they differ; `groups` query heads share
    one). Causal; within `rule.window` tokens; an image block's rows see each other both ways."""
    q, held = query_index.numel(), held_index.shape[-1]
    window = rule.window
    within_window = window is not None and int(query_index.max()) - int(held_index.min() if held else
                                                                         query_index.min()) < window
    use_blocks = rule.image_blocks and blocks is not None and q > 1 and bool((blocks >= 0).any())
    if (window is None or within_window) and not use_blocks:
        if q == 1 or held == 0:
            return None  # decode attends all; a plain prefill is SDPA's causal
        window = None
    new = query_index[None, :] <= query_index[:, None]
    if use_blocks:
        new = new | ((blocks[None, :] == blocks[:, None]) & (blocks[:, None] >= 0))
    if window is not None:
        new = new & (query_index[:, None] - query_index[None, :] < window)
    past = torch.ones(held_index.shape[0], q, held, dtype=torch.bool, device=query_index.device)
    if window is not None:
        past = query_index[None, :, None] - held_index[:, None, :] < window
    mask = torch.cat([past, new.expand(past.shape[0], q, q)], dim=-1)
    if mask.shape[0] > 1:
        mask = mask.repeat_interleave(groups, dim=0)
    return mask[None]


def _fed_index(cache, count: int, device) -> torch.Tensor:
    """This forward's rows by index in feed order: the cache's own numbering where it has one,
    else counted on from what layer 0 holds (a cache that keeps every row)."""
    index = getattr(cache, "forward_index", None)
    if index is not None and index() is not None:
        return index().to(device)
    start = cache.get_seq_length(0) if cache is not None else 0
    return torch.arange(start, start + count, device=device)


def _held_index(cache, layer_idx: int, fed: torch.Tensor) -> torch.Tensor:
    """`[1 or H_kv, held]`: the feed index of each row a layer holds before this forward."""
    if cache is None or layer_idx >= len(cache.layers):
        return fed[:0][None]
    held_index = getattr(cache, "held_index", None)
    if held_index is not None:
        return held_index(layer_idx).to(fed.device)
    past = cache.get_seq_length(layer_idx)
    start = int(fed[0]) - past if fed.numel() else 0
    return torch.arange(start, start + past, device=fed.device)[None]


def _query_groups(decoder_layer) -> int:
    """Query heads per key head (grouped-query attention)."""
    config = decoder_layer.self_attn.config
    return config.num_attention_heads // (getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


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


def static_decode_step(backbone: TextBackbone, ids: torch.Tensor, embeddings: list[tuple],
                       position_ids: torch.Tensor, step) -> torch.Tensor:
    """One generated token (`ids` `[1, 1]`, each layer's rotary (cos, sin) and the position ids)
    through every layer over a `StaticStep`'s fixed-shape storage; the next logits `[vocab]`.
    Every shape is fixed between eviction rounds and nothing returns to Python: what
    `torch.compile` captures. A sliding layer needs no mask of its own: the cache holds only its
    window."""
    hidden = backbone.embed_tokens(ids)
    layer_position_ids = backbone.layer_position_ids(position_ids)
    for layer_idx, decoder_layer in enumerate(backbone.layers):
        hidden = decoder_layer(
            hidden,
            attention_mask=step.attention_mask(layer_idx),
            position_ids=layer_position_ids,
            cache=step,
            use_cache=True,
            position_embeddings=embeddings[layer_idx],
            hae_step=step,
        )
    return backbone.lm_head(backbone.norm(hidden))[0, -1]
