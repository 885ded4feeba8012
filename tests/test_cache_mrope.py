"""The cache with multimodal rotary positions (Qwen2-VL's M-RoPE): three position rows per token,
repeated within an image. A token is known by its index in feed order, never by its position,
so eviction, the bin and HAE's prefill pruning work as with plain positions: evicting equals
masking, and every layer holds distinct, increasing token indices."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import DynamicCache
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLTextModel

from cache_helpers import fake_prompt, hide_keys
from hae_cli.cache import EvictingCache, Modality, register_attention
from hae_cli.model.decoder import TextBackbone, run_decoder

VOCAB, STEPS, ATOL = 96, 12, 2e-5
TEXT_BEFORE, GRID, TEXT_AFTER = 6, (4, 6), 8  # an image of 4 x 6 merged patches between two texts


@pytest.fixture(scope="module")
def backbone() -> TextBackbone:
    torch.manual_seed(0)
    config = Qwen2VLTextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )
    config._attn_implementation = register_attention()
    model = Qwen2VLTextModel(config).float().eval()
    for parameter in model.parameters():  # weights large enough that greedy tokens do not flip on noise
        if parameter.dim() == 2:
            nn.init.normal_(parameter, std=parameter.shape[1] ** -0.5)
    nn.init.normal_(model.embed_tokens.weight)
    head = nn.Linear(64, VOCAB, bias=False)
    nn.init.normal_(head.weight, std=64**-0.5)
    return TextBackbone(model.layers, model.rotary_emb, model.norm, head, model.embed_tokens,
                        layer_position_ids=lambda ids: None)


def mrope_positions() -> tuple[torch.Tensor, int]:
    """`[3, 1, L]`: text counts on in all three rows; the image's tokens share their t row and
    repeat their h row along a row of patches, as Qwen2-VL's `get_rope_index` lays them out."""
    rows, cols = GRID
    before = torch.arange(TEXT_BEFORE).expand(3, -1)
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    image = torch.stack([torch.zeros(rows * cols, dtype=torch.long), r.reshape(-1), c.reshape(-1)]) + TEXT_BEFORE
    start = TEXT_BEFORE + max(rows, cols)
    after = torch.arange(start, start + TEXT_AFTER).expand(3, -1)
    return torch.cat([before, image, after], dim=1)[:, None], start + TEXT_AFTER


def decode(backbone, cache, after_step=None, mask_fn=None):
    """Greedy steps through the decoder walk; `mask_fn(step, q, kv)` hides keys (the reference)."""
    ids, modality, image_id = fake_prompt(before=TEXT_BEFORE, images=GRID[0] * GRID[1], after=TEXT_AFTER, sep_every=0)
    positions, next_position = mrope_positions()
    logits, tokens = [], []
    with torch.no_grad():
        embeds, rows = backbone.embed_tokens(ids)[None], positions
        for step in range(STEPS + 1):
            if hasattr(cache, "begin_tokens"):
                tags = (modality, image_id) if step == 0 else (torch.tensor([int(Modality.GENERATED)], dtype=torch.int8),)
                cache.begin_tokens(*tags)
            q = embeds.shape[1]
            kv = (cache.get_seq_length(0) if step else 0) + q
            mask = mask_fn(step, q, kv) if mask_fn is not None else None
            out = run_decoder(backbone, embeds, rows, cache, attention_mask=mask)
            if hasattr(cache, "end_step"):
                cache.end_step()
            if after_step is not None:
                after_step(step, cache)
            logits.append(out.logits[0, -1])
            token = int(logits[-1].argmax())
            tokens.append(token)
            embeds = backbone.embed_tokens(torch.tensor([[token]]))
            rows = torch.full((3, 1, 1), next_position + step)
    return tokens, torch.stack(logits)


def test_positions_repeat_within_the_image_but_token_indices_do_not(backbone):
    positions, _ = mrope_positions()
    assert positions[0, 0].unique().numel() < positions.shape[-1], "the t row repeats across the image"
    cache = EvictingCache("full", len(backbone.layers))
    decode(backbone, cache)
    for layer in cache.layers:
        held = layer.token_index[0]
        assert held.tolist() == list(range(cache.tokens_fed)) and bool((held[1:] > held[:-1]).all())


def test_evicting_equals_masking_with_three_position_rows(backbone):
    length = TEXT_BEFORE + GRID[0] * GRID[1] + TEXT_AFTER
    dropped_prefill = {0, 7, 8, 13, 14, 20, 27}  # text, and image tokens that share position rows
    dropped_decode = {3, 9, 10, length + 1, length + 3}

    def evict(step, cache):
        dropped = dropped_prefill if step == 0 else dropped_decode if step == 5 else None
        if dropped is None:
            return
        for layer in cache.layers:
            keep = (~torch.isin(layer.token_index[0], torch.tensor(sorted(dropped)))).nonzero().squeeze(-1)
            layer.compact(keep)

    def mask(step, q, kv):
        hidden = (dropped_prefill if step > 0 else set()) | (dropped_decode if step > 5 else set())
        return hide_keys(q, kv, hidden) if hidden else None

    tokens, logits = decode(backbone, EvictingCache("full", len(backbone.layers)), after_step=evict)
    ref_tokens, ref_logits = decode(backbone, DynamicCache(), mask_fn=mask)
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)
    plain, _ = decode(backbone, EvictingCache("full", len(backbone.layers)))
    assert plain != tokens, "eviction should matter"


def test_hae_prunes_binds_and_restores_by_token_index(backbone):
    """HAE's prefill pruning (index broadcasting), decode rounds and the bin under M-RoPE: every
    layer's held and binned indices stay distinct, ascending, and never both held and binned."""
    cache = EvictingCache("hae", len(backbone.layers), score_layer=1, budget=20, buffer=4, recent=4, sink=2)
    decode(backbone, cache)
    assert any(e.action == "evicted" and e.stage == "prefill" for e in cache.events)
    assert any(e.action == "binned" for e in cache.events)
    for layer, aside in zip(cache.layers, cache.asides):
        held = layer.token_index[0]
        assert bool((held[1:] > held[:-1]).all())
        assert not bool(torch.isin(aside.bin.token_index, held).any())
        assert layer.held <= layer.budget + 4
