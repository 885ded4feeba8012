"""The decoder walk's per-layer rules, held to transformers' own text models (tiny, random, float32):
Gemma 3's interleaved sliding-window and global layers, each with its own rotary embedding;
its image blocks that see each other both ways at prefill; Qwen3-VL's deepstack additions. The
evicting cache bounds a sliding layer by its window under every policy, and the compiled step's
fixed-shape walk gives the same logits as the eager one."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from transformers import DynamicCache, Gemma3ForCausalLM, Gemma3TextConfig
from transformers.models.gemma3.modeling_gemma3 import create_masks_for_vision_model

from hae_cli.cache import EvictingCache
from hae_cli.cache.policies import POLICIES
from hae_cli.model.compiled import CompiledStep
from hae_cli.model.decoder import LayerRule, TextBackbone, run_decoder

torch.set_num_threads(1)
ATOL = 1e-4
WINDOW = 5
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]


def scaled(model: nn.Module, seed: int) -> nn.Module:
    """Weights large enough that attention is far from uniform (a window then changes the logits)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / parameter.shape[1] ** 0.5 * 2)
            elif "norm" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def gemma():
    config = Gemma3TextConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=WINDOW, layer_types=LAYER_TYPES,
        max_position_embeddings=256,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 10000.0}},
    )
    config._attn_implementation = "sdpa"
    return scaled(Gemma3ForCausalLM(config), seed=0)


def gemma_backbone(lm) -> TextBackbone:
    """As a family's folder would say it: each layer's rotary embedding and window from its type."""
    config, inner = lm.config, lm.model
    rules = [LayerRule(rotary=kind, window=config.sliding_window if kind == "sliding_attention" else None,
                       image_blocks=True) for kind in config.layer_types]
    return TextBackbone(inner.layers, inner.rotary_emb, inner.norm, lm.lm_head, inner.embed_tokens, rules=rules)


def ids(count: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(3, 96, (1, count), generator=torch.Generator().manual_seed(seed))


def walk(backbone, tokens: torch.Tensor, chunks: list[int], cache, step=None) -> torch.Tensor:
    """Our logits for every row: the first chunks as forwards of several tokens, then one token a step
    (through `step`, a `CompiledStep`, where given)."""
    logits, start = [], 0
    with torch.inference_mode():
        for size in chunks:
            part = tokens[:, start : start + size]
            _begin(cache, torch.zeros(size, dtype=torch.int8))
            positions = torch.arange(start, start + size)
            logits.append(run_decoder(backbone, backbone.embed_tokens(part), positions, cache, logits_rows=None).logits[0])
            _end(cache)
            start += size
        for position in range(start, tokens.shape[1]):
            token = tokens[:, position : position + 1]
            if step is not None:
                logits.append(step(int(token), position)[None])
                continue
            _begin(cache, torch.full((1,), 3, dtype=torch.int8))
            logits.append(run_decoder(backbone, backbone.embed_tokens(token), torch.tensor([position]), cache).logits[0])
            _end(cache)
    return torch.cat(logits)


def _begin(cache, modality: torch.Tensor) -> None:
    if isinstance(cache, EvictingCache):
        cache.begin_tokens(modality)


def _end(cache) -> None:
    if isinstance(cache, EvictingCache):
        cache.end_step()


def test_sliding_and_global_layers_equal_gemma3s_own_forward(gemma):
    """A prompt longer than the window, a second forward of several tokens over held rows (a chat
    turn), then decode steps: every row's logits equal one forward of Gemma3ForCausalLM, and each
    sliding layer holds no more than its window needs."""
    tokens = ids(24)
    with torch.inference_mode():
        expected = gemma(tokens).logits[0]
    backbone = gemma_backbone(gemma)
    cache = EvictingCache("full", 4)
    ours = walk(backbone, tokens, [9, 6], cache)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)
    held = [layer.held for layer in cache.layers]
    assert held == [WINDOW - 1, 24, WINDOW - 1, WINDOW - 1], held
    assert [layer.token_index[0].tolist() for layer in cache.layers][0] == list(range(24 - WINDOW + 1, 24))
    # the window matters: without it the sliding layers would see more
    plain = TextBackbone(backbone.layers, backbone.rotary_emb, backbone.norm, backbone.lm_head, backbone.embed_tokens,
                         rules=[LayerRule(rotary=kind) for kind in LAYER_TYPES])
    assert not torch.allclose(walk(plain, tokens, [9, 6], DynamicCache()), expected, atol=1e-2)


def test_the_compiled_steps_walk_equals_the_eager_one_on_sliding_layers(gemma):
    tokens = ids(20, seed=4)
    with torch.inference_mode():
        expected = gemma(tokens).logits[0]
    backbone = gemma_backbone(gemma)
    cache = EvictingCache("full", 4)
    model = _StepModel(backbone)
    step = CompiledStep(model, cache, compile=False)
    with torch.inference_mode():
        cache.begin_tokens(torch.zeros(8, dtype=torch.int8))
        first = run_decoder(backbone, backbone.embed_tokens(tokens[:, :8]), torch.arange(8), cache, logits_rows=None)
        cache.end_step()
        step.make_room(12)
        ours = walk(backbone, tokens[:, 8:], [], cache, step=_Offset(step, tokens, 8))
    torch.testing.assert_close(torch.cat([first.logits[0], ours]), expected, atol=ATOL, rtol=0)
    assert max(cache.layers[0].held, cache.layers[2].held) == WINDOW - 1


@pytest.mark.parametrize("policy", [name for name in POLICIES if name != "full"])
def test_a_sliding_layer_holds_no_more_than_its_window_under_every_policy(gemma, policy):
    fields = {field.name for field in dataclasses.fields(POLICIES[policy])}
    params = {name: value for name, value in {"budget": 12, "buffer": 2}.items() if name in fields}
    cache = EvictingCache(policy, 4, **params)
    tokens = ids(30, seed=5)
    seen = []

    def record():
        for layer in cache.layers:
            if layer.window is not None:
                oldest = int(layer.token_index.min()) if layer.held else cache.tokens_fed
                seen.append((layer.held, cache.tokens_fed - oldest))

    backbone = gemma_backbone(gemma)
    with torch.inference_mode():
        cache.begin_tokens(torch.zeros(16, dtype=torch.int8))
        run_decoder(backbone, backbone.embed_tokens(tokens[:, :16]), torch.arange(16), cache)
        cache.end_step()
        record()
        for position in range(16, 30):
            cache.begin_tokens(torch.full((1,), 3, dtype=torch.int8))
            run_decoder(backbone, backbone.embed_tokens(tokens[:, position : position + 1]), torch.tensor([position]),
                        cache)
            cache.end_step()
            record()
    assert seen and all(held <= WINDOW - 1 and age <= WINDOW - 1 for held, age in seen), seen
    assert all(layer.capacity <= WINDOW for layer in cache.layers if layer.window is not None)


def test_an_images_tokens_see_each_other_both_ways_as_in_gemma3(gemma):
    """Two images in one prompt: each image's tokens attend to each other both ways, within the
    window on sliding layers, as transformers' Gemma 3 masks say."""
    tokens = ids(17, seed=6)
    blocks = torch.tensor([-1] * 3 + [0] * 4 + [-1] * 2 + [1] * 5 + [-1] * 3)
    token_types = (blocks >= 0).long()[None]
    with torch.inference_mode():
        embeds = gemma.model.embed_tokens(tokens)
        positions = torch.arange(17)[None]
        from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

        masks = create_masks_for_vision_model(gemma.config, embeds, None, None, positions,
                                              get_block_sequence_ids_for_mask(token_types))
        hidden = gemma.model(inputs_embeds=embeds, attention_mask=masks, position_ids=positions).last_hidden_state
        expected = gemma.lm_head(hidden)[0]
        ours = run_decoder(gemma_backbone(gemma), embeds, positions, EvictingCache("full", 4), logits_rows=None,
                           image_blocks=blocks).logits[0]
        causal = gemma(tokens).logits[0]
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)
    assert not torch.allclose(expected[3:7], causal[3:7], atol=1e-2)  # the blocks change the image rows


def test_deepstack_additions_equal_qwen3_vls_text_model():
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextModel

    config = Qwen3VLTextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                               rope_parameters={"rope_type": "default", "rope_theta": 1000.0,
                                                "mrope_section": [2, 1, 1], "mrope_interleaved": True})
    config._attn_implementation = "sdpa"
    model = scaled(Qwen3VLTextModel(config), seed=1)
    embeds = torch.randn(1, 12, 32, generator=torch.Generator().manual_seed(2))
    visual = torch.zeros(1, 12, dtype=torch.bool)
    visual[0, 3:8] = True
    deep = [torch.randn(5, 32, generator=torch.Generator().manual_seed(k)) for k in (3, 4)]
    positions = torch.arange(12).view(1, 1, -1).expand(3, 1, -1)
    with torch.inference_mode():
        expected = model(inputs_embeds=embeds, position_ids=positions, visual_pos_masks=visual,
                         deepstack_visual_embeds=deep).last_hidden_state[0]
        additions = {}
        for layer_idx, features in enumerate(deep):
            addition = torch.zeros(1, 12, 32)
            addition[visual] = features
            additions[layer_idx] = addition
        backbone = TextBackbone(model.layers, model.rotary_emb, model.norm, nn.Identity(), model.embed_tokens,
                                layer_position_ids=lambda ids: None, rules=[LayerRule()] * 3)
        ours = run_decoder(backbone, embeds, positions, DynamicCache(), logits_rows=None, additions=additions)
        without = run_decoder(backbone, embeds, positions, DynamicCache(), logits_rows=None)
    torch.testing.assert_close(ours.logits[0], expected, atol=ATOL, rtol=0)
    assert not torch.allclose(without.logits[0], expected, atol=1e-2)


class _StepModel:
    """What `CompiledStep` reads of a loaded model, for a bare text decoder."""

    def __init__(self, backbone: TextBackbone) -> None:
        self.backbone = backbone
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def decode_position_ids(self, position: int) -> torch.Tensor:
        return torch.tensor([[position]])


class _Offset:
    """A `CompiledStep` fed positions counted from the whole sequence's start."""

    def __init__(self, step: CompiledStep, tokens: torch.Tensor, start: int) -> None:
        self.step, self.start = step, start

    def __call__(self, token: int, position: int) -> torch.Tensor:
        return self.step(token, position + self.start)


def test_per_head_eviction_with_windows_equals_masking_per_head(gemma):
    """Where heads hold different tokens (a per-head policy's choice: here a global and a sliding
    layer keep alternate old tokens in their two key heads), a later forward of several tokens (a
    chat turn) gets a mask per head: each head's window over what it holds, causality. Every
    step's logits equal a full cache masking, per head, what was not held."""
    backbone = gemma_backbone(gemma)
    cache = EvictingCache("full", 4)
    tokens, chunks = ids(30, seed=7), [12] + [1] * 12 + [6]
    held, ours, start = [], [], 0
    with torch.inference_mode():
        for step, size in enumerate(chunks):
            if step == len(chunks) - 1:  # before the turn: the heads of a global and a sliding layer
                for layer, recent in ((cache.layers[1], 4), (cache.layers[0], 0)):  # keep different tokens
                    rows = torch.arange(layer.held)
                    old = rows[: layer.held - recent]
                    layer.compact(torch.stack([torch.cat([old[head::2], rows[layer.held - recent:]]) for head in (0, 1)]))
            held.append([cache.held_index(i).clone() for i in range(4)])  # [1 or H_kv, n] before the step
            cache.begin_tokens(torch.zeros(size, dtype=torch.int8))
            ours.append(run_decoder(backbone, backbone.embed_tokens(tokens[:, start : start + size]),
                                    torch.arange(start, start + size), cache, logits_rows=None).logits[0])
            cache.end_step()
            start += size
    assert held[-1][0].shape[0] == held[-1][1].shape[0] == 2, "before the turn, heads hold different tokens"

    groups = gemma.config.num_attention_heads // gemma.config.num_key_value_heads
    reference, start, full = [], 0, DynamicCache()
    with torch.inference_mode():
        for step, size in enumerate(chunks):
            hidden = backbone.embed_tokens(tokens[:, start : start + size])
            positions = torch.arange(start, start + size)[None]
            embeddings = backbone.position_embeddings(hidden, positions)
            query = torch.arange(start, start + size)
            keys = torch.arange(start + size)
            for layer_idx, layer in enumerate(backbone.layers):
                allowed = keys[None, :] <= query[:, None]
                window = backbone.rule(layer_idx).window
                if window is not None:
                    allowed = allowed & (query[:, None] - keys[None, :] < window)
                per_head = allowed.expand(held[step][layer_idx].shape[0], -1, -1).clone()
                if step:
                    past = torch.zeros(per_head.shape[0], start, dtype=torch.bool)
                    past.scatter_(1, held[step][layer_idx], True)
                    per_head[:, :, :start] &= past[:, None, :]
                mask = per_head.repeat_interleave(groups, dim=0)[None] if per_head.shape[0] > 1 else per_head[None]
                hidden = layer(hidden, attention_mask=mask, position_ids=positions, cache=full, use_cache=True,
                               position_embeddings=embeddings[layer_idx])
            reference.append(backbone.lm_head(backbone.norm(hidden))[0])
            start += size
    torch.testing.assert_close(torch.cat(ours), torch.cat(reference), atol=ATOL, rtol=0)
