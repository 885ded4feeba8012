"""Shared pieces for the cache and policy tests: a tiny Phi-3, fake multimodal prompts, greedy
decoding through our decoder loop, and a masked full-cache reference.

The real generation loop lives in `hae_cli/model/generate.py`; `greedy` here is a minimal
loop with the same contract (`begin_tokens` before each forward, `end_step` after it).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, Phi3Config, Phi3ForCausalLM

from hae_cli.cache import EvictingCache, Modality
from hae_cli.cache.attention import ATTENTION_NAME, register_attention
from hae_cli.model.decoder import run_decoder
from hae_cli.model.generate import SamplingConfig, decode

VOCAB = 96
KV_HEADS = 2
HEADS = 4
HEAD_DIM = 16


def tiny_lm(layers: int = 4, seed: int = 0, attention: str = "hae_sdpa") -> Phi3ForCausalLM:
    """A random Phi-3 (hidden 64, 4 heads over 2 KV heads) whose greedy output is not constant."""
    torch.manual_seed(seed)
    config = Phi3Config(
        vocab_size=VOCAB,
        hidden_size=HEADS * HEAD_DIM,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=1024,
        initializer_range=0.2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    lm = Phi3ForCausalLM(config).float().eval()
    if attention == ATTENTION_NAME:
        register_attention()  # a file run alone: no EvictingCache has registered it yet
    lm.config._attn_implementation = attention
    return lm


def fake_prompt(before: int = 6, images: int = 24, after: int = 8, sep_every: int = 6, seed: int = 0):
    """Text, an image block (a SEPARATOR every `sep_every` tokens), then the instruction text."""
    gen = torch.Generator().manual_seed(seed)
    length = before + images + after
    ids = torch.randint(3, VOCAB, (length,), generator=gen)
    modality = torch.full((length,), int(Modality.TEXT), dtype=torch.int8)
    image_id = torch.zeros(length, dtype=torch.int16)
    block = torch.arange(before, before + images)
    modality[block] = int(Modality.IMAGE)
    if sep_every:
        modality[block[sep_every - 1 :: sep_every]] = int(Modality.SEPARATOR)
    image_id[block] = 1
    return ids, modality, image_id


def greedy(lm, ids, modality, image_id, cache, steps: int, after_step=None, overview=None):
    """Greedy decoding: the runtime's own loop (`generate.decode`) feeding each token through
    `run_decoder`.

    Returns (generated ids, logits `[steps + 1, vocab]`, decoder outputs). `after_step(step,
    cache, tokens)` runs after each forward's `end_step` (step 0 = prefill; `tokens`: the
    ids fed so far, prompt included), e.g. to evict by hand or check invariants.
    """
    embed = lm.model.embed_tokens
    length = ids.numel()
    fed, outputs = ids.tolist(), []

    def forward(rows: torch.Tensor, positions: torch.Tensor, modality, image_id, overview=None) -> torch.Tensor:
        _begin(cache, positions, modality, image_id, overview)
        outputs.append(run_decoder(lm, embed(rows), positions, cache))
        _end(cache, len(outputs) - 1, after_step, list(fed))
        return outputs[-1].logits[0, -1]

    def feed(token: int, position: int) -> torch.Tensor:
        fed.append(token)
        generated = torch.tensor([int(Modality.GENERATED)], dtype=torch.int8)
        return forward(torch.tensor([[token]]), torch.tensor([position]), generated, torch.zeros(1, dtype=torch.int16))

    tokens = []
    with torch.no_grad():
        logits = forward(ids[None], torch.arange(length), modality, image_id, overview)
        if steps:
            tokens = decode(None, cache, logits, length, SamplingConfig(max_new_tokens=steps), stop_ids=set(),
                            feed_last=True, feed=feed).token_ids
    return tokens, torch.stack([out.logits[0, -1] for out in outputs]), outputs


def masked_greedy(lm, ids, steps: int, mask_fn):
    """The reference: a full DynamicCache where `mask_fn(step, layer, q, kv)` (a bool
    `[1, 1 or H, q, kv]` mask or None) hides keys, layer by layer. Key index == position here.
    Returns (generated ids, logits `[steps + 1, vocab]`)."""
    backbone = lm.model
    cache = DynamicCache(config=lm.config)
    tokens, logits = [], []

    def forward(embeds, positions, step):
        hidden, position_ids = embeds, positions[None]
        cos, sin = backbone.rotary_emb(hidden, position_ids=position_ids)
        q = hidden.shape[1]
        for layer_idx, layer in enumerate(backbone.layers):
            mask = mask_fn(step, layer_idx, q, cache.get_seq_length(layer_idx) + q)
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
                position_embeddings=(cos, sin),
            )
        return lm.lm_head(backbone.norm(hidden))[0, -1]

    with torch.no_grad():
        length = ids.numel()
        logits.append(forward(backbone.embed_tokens(ids)[None], torch.arange(length), 0))
        for step in range(1, steps + 1):
            token = int(logits[-1].argmax())
            tokens.append(token)
            embeds = backbone.embed_tokens(torch.tensor([[token]]))
            logits.append(forward(embeds, torch.tensor([length + step - 1]), step))
    return tokens, torch.stack(logits)


def hide_keys(q: int, kv: int, hidden_positions) -> torch.Tensor:
    """Causal bool mask `[1, 1, q, kv]` (this forward's rows last) with `hidden_positions` masked."""
    past = kv - q
    keys = torch.arange(kv)
    allowed = keys[None, :] <= past + torch.arange(q)[:, None]
    hidden = torch.as_tensor(sorted(hidden_positions), dtype=torch.long)
    allowed &= ~torch.isin(keys, hidden)[None, :]
    return allowed[None, None]


def dynamic_cache(lm) -> DynamicCache:
    return DynamicCache(config=lm.config)


def evicting_cache(lm, policy="full", **params) -> EvictingCache:
    return EvictingCache.from_config(lm.config, policy, **params)


def layer0_qkv(lm, token_ids: torch.Tensor, positions: torch.Tensor):
    """Layer 0's post-RoPE queries `[1, H, n, D]`, keys and values `[1, H_kv, n, D]`, recomputed.

    Layer 0's projections depend only on the token and its position, so a cached row can be
    checked against the token fed at the position it claims.
    """
    backbone = lm.model
    attn = backbone.layers[0].self_attn
    with torch.no_grad():
        hidden = backbone.layers[0].input_layernorm(backbone.embed_tokens(token_ids)[None])
        qkv = attn.qkv_proj(hidden)
        q_size, kv_size = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
        queries = qkv[..., :q_size].view(1, -1, HEADS, HEAD_DIM).transpose(1, 2)
        keys = qkv[..., q_size : q_size + kv_size].view(1, -1, KV_HEADS, HEAD_DIM).transpose(1, 2)
        values = qkv[..., q_size + kv_size :].view(1, -1, KV_HEADS, HEAD_DIM).transpose(1, 2)
        cos, sin = backbone.rotary_emb(hidden, position_ids=positions[None])
        cos, sin = cos[:, None], sin[:, None]
        half = HEAD_DIM // 2

        def rope(x):
            return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin

    return rope(queries), rope(keys), values


def layer0_keys_values(lm, token_ids: torch.Tensor, positions: torch.Tensor):
    _, keys, values = layer0_qkv(lm, token_ids, positions)
    return keys, values


def _begin(cache, positions, modality, image_id, overview=None):
    if hasattr(cache, "begin_tokens"):
        cache.begin_tokens(modality, image_id, overview)


def _end(cache, step, after_step, fed):
    if hasattr(cache, "end_step"):
        cache.end_step()
    if after_step is not None:
        after_step(step, cache, fed)
