"""Evicting a token must equal masking it on a full cache: same logits, step after step.

The reference (`masked_greedy`) keeps every token in a DynamicCache and hides the evicted
ones with a bool attention mask, layer by layer; the evicting run really removes them.
"""

import pytest
import torch

from cache_helpers import HEADS, KV_HEADS, evicting_cache, fake_prompt, greedy, hide_keys, masked_greedy

from hae_cli.cache.rounds import evict_to_bin, restore

STEPS = 20
ATOL = 2e-5


@pytest.fixture(scope="module")
def prompt():
    return fake_prompt(before=6, images=36, after=10)


def _drop_positions(cache, dropped):
    dropped = torch.tensor(sorted(dropped))
    for layer in cache.layers:
        keep = (~torch.isin(layer.token_index[0], dropped)).nonzero().squeeze(-1)
        layer.compact(keep)


def _assert_same(result, reference):
    tokens, logits, _ = result
    ref_tokens, ref_logits = reference
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)


def test_eviction_after_prefill_equals_masking(lm, prompt):
    dropped = {0, 7, 8, 9, 15, 22, 31, 40, 47}

    def evict(step, cache, fed):
        if step == 0:
            _drop_positions(cache, dropped)

    result = greedy(lm, *prompt, evicting_cache(lm), STEPS, after_step=evict)
    reference = masked_greedy(lm, prompt[0], STEPS, lambda s, layer, q, kv: hide_keys(q, kv, dropped) if s else None)
    _assert_same(result, reference)
    assert result[0] != greedy(lm, *prompt, evicting_cache(lm), STEPS)[0], "eviction should matter"


def test_eviction_mid_decode_equals_masking(lm, prompt):
    length = prompt[0].numel()
    dropped = {2, 11, 12, 30, length + 1, length + 3}  # prompt and generated tokens

    def evict(step, cache, fed):
        if step == 6:
            _drop_positions(cache, dropped)

    result = greedy(lm, *prompt, evicting_cache(lm), STEPS, after_step=evict)
    reference = masked_greedy(
        lm, prompt[0], STEPS, lambda s, layer, q, kv: hide_keys(q, kv, dropped) if s > 6 else None
    )
    _assert_same(result, reference)


def test_per_head_eviction_equals_per_head_masking(lm, prompt):
    per_head = [{3, 9, 10, 20, 33}, {4, 9, 25, 26, 41}]  # same count, different tokens per KV head

    def evict(step, cache, fed):
        if step == 0:
            for layer in cache.layers:
                keep = [
                    (~torch.isin(layer.token_index[h], torch.tensor(sorted(per_head[h])))).nonzero().squeeze(-1)
                    for h in range(KV_HEADS)
                ]
                layer.compact(torch.stack(keep))

    def mask(step, layer_idx, q, kv):
        if step == 0:
            return None
        group = HEADS // KV_HEADS
        return torch.cat([hide_keys(q, kv, per_head[h // group]) for h in range(HEADS)], dim=1)

    result = greedy(lm, *prompt, evicting_cache(lm), STEPS, after_step=evict)
    _assert_same(result, masked_greedy(lm, prompt[0], STEPS, mask))


def test_bin_round_trip_equals_masking_while_out(lm, prompt):
    """Tokens in the bin are not attended; restored, they are attended again, unchanged."""
    binned = {5, 13, 14, 28, 44}
    out_from, back_after = 4, 9

    def move(step, cache, fed):
        for layer, aside in zip(cache.layers, cache.asides):
            if step == out_from:
                evict_to_bin(layer, aside.bin, torch.isin(layer.token_index[0], torch.tensor(sorted(binned))).nonzero().squeeze(-1))
                assert layer.held == prompt[0].numel() + step - len(binned)
            if step == back_after:
                restore(layer, aside.bin, torch.arange(len(aside.bin)))
                assert len(aside.bin) == 0 and layer.held == prompt[0].numel() + step
                assert bool((layer.token_index[:, 1:] > layer.token_index[:, :-1]).all())

    result = greedy(lm, *prompt, evicting_cache(lm), STEPS, after_step=move)
    reference = masked_greedy(
        lm, prompt[0], STEPS, lambda s, layer, q, kv: hide_keys(q, kv, binned) if out_from < s <= back_after else None
    )
    _assert_same(result, reference)


@pytest.mark.parametrize("score_layer", [0, 1, 2])
def test_index_broadcasting_equals_masking_from_the_scoring_layer_on(lm, prompt, score_layer):
    """HAE's Stage 1: layers after `score_layer` never see the dropped tokens; at decode, no layer does."""
    cache = evicting_cache(lm, "hae", score_layer=score_layer, budget=500, visual_keep=0.4, r_i=0.9)
    result = greedy(lm, *prompt, cache, STEPS)
    kept = set(cache.layers[0].token_index[0].tolist())
    dropped = set(range(prompt[0].numel())) - kept
    assert dropped, "DAP should drop some visual tokens"
    assert all(prompt[1][p] == 1 for p in dropped), "only image tokens may be dropped at prefill"

    def mask(step, layer_idx, q, kv):
        if step == 0 and layer_idx <= score_layer:
            return None
        return hide_keys(q, kv, dropped)

    _assert_same(result, masked_greedy(lm, prompt[0], STEPS, mask))


def test_dropping_emptied_rows_separators_equals_masking_them(lm, prompt):
    """HAE's separators=with_row: the separators dropped with their rows are never seen again."""
    cache = evicting_cache(lm, "hae", score_layer=1, visual_keep=0.1, image_floor=0.0, r_i=1.0, separators="with_row")
    result = greedy(lm, *prompt, cache, STEPS)
    dropped = set(range(prompt[0].numel())) - set(cache.layers[0].token_index[0].tolist())
    assert any(prompt[1][p] == 2 for p in dropped), "some separator went with its row"

    def mask(step, layer_idx, q, kv):
        return None if step == 0 and layer_idx <= 1 else hide_keys(q, kv, dropped)

    _assert_same(result, masked_greedy(lm, prompt[0], STEPS, mask))


def test_random_dropping_equals_masking_in_every_layer_but_the_first_prefill(lm, prompt):
    """Random drops at layer 0's prefill and broadcasts: the first layer's prefill saw every
    token, every later computation none of the dropped ones."""
    cache = evicting_cache(lm, "random", budget=prompt[0].numel() - 12, seed=1)
    result = greedy(lm, *prompt, cache, STEPS)
    dropped = set(range(prompt[0].numel())) - set(cache.layers[0].token_index[0].tolist())
    assert len(dropped) == 12 and all(prompt[1][p] == 1 for p in dropped)

    def mask(step, layer_idx, q, kv):
        return None if step == 0 and layer_idx == 0 else hide_keys(q, kv, dropped)

    _assert_same(result, masked_greedy(lm, prompt[0], STEPS, mask))


def test_fastv_pruning_equals_masking_in_later_layers_only(lm, prompt):
    """FastV: layers before `prune_layer` keep every token; later layers never see the dropped ones."""
    cache = evicting_cache(lm, "fastv", prune_layer=2, drop_ratio=0.5)
    result = greedy(lm, *prompt, cache, STEPS)
    dropped = set(range(prompt[0].numel())) - set(cache.layers[3].token_index[0].tolist())
    assert len(dropped) == int(0.5 * int((prompt[1] == 1).sum()))
    assert cache.layers[0].held == cache.layers[1].held == prompt[0].numel() + STEPS

    def mask(step, layer_idx, q, kv):
        return hide_keys(q, kv, dropped) if layer_idx >= 2 else None

    _assert_same(result, masked_greedy(lm, prompt[0], STEPS, mask))
