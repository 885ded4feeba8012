"""HAE's index broadcasting: one kept set, computed at the scoring layer, for every layer."""

import math

import pytest
import torch

from cache_helpers import evicting_cache, fake_prompt, greedy
from hae_cli.cache import Modality


@pytest.mark.parametrize("score_layer", [0, 1, 3])
def test_hidden_rows_after_the_scoring_layer_are_the_kept_set(lm, score_layer):
    ids, modality, image_id = fake_prompt(before=5, images=30, after=7)
    length = ids.numel()
    cache = evicting_cache(lm, "hae", score_layer=score_layer, visual_keep=0.4, r_i=0.9)
    _, _, outputs = greedy(lm, ids, modality, image_id, cache, 2)
    prefill = outputs[0]
    held = cache.layers[0].token_index[0]
    kept = held[held < length]
    n_kept = kept.numel()
    n_visual = int((modality == Modality.IMAGE).sum())
    n_dropped = length - n_kept
    assert 0 < n_dropped <= n_visual - math.ceil(0.4 * n_visual), "visual_keep=0.4 keeps at least 40% of image tokens"
    assert prefill.hidden_lengths == [length] * (score_layer + 1) + [n_kept] * (3 - score_layer)
    assert torch.equal(prefill.kept_rows, kept)
    for layer in cache.layers:
        positions = layer.token_index[:, :n_kept]  # the prompt part (two generated tokens follow)
        assert torch.equal(positions, kept.expand_as(positions)), "the same kept set in every layer and head"
        assert layer.token_index[0, n_kept:].tolist() == [length, length + 1], "decoding continues at the prompt length"
    dropped = set(range(length)) - set(kept.tolist())
    assert all(modality[p] == Modality.IMAGE for p in dropped), "text and separators are never dropped"
    assert cache.tokens_fed == length + 2
    prefill_events = [e for e in cache.events if e.stage == "prefill"]
    assert sorted(e.layer for e in prefill_events) == [0, 1, 2, 3]
    assert all(e.counts["image"] == n_dropped and e.action == "evicted" for e in prefill_events)


def test_thresholds_keep_what_the_individual_score_needs(lm):
    ids, modality, image_id = fake_prompt(before=5, images=30, after=7, sep_every=0)
    strict = evicting_cache(lm, "hae", r_g=1.0, r_i=1.0)  # drop below-uniform tokens unless it is the max
    loose = evicting_cache(lm, "hae", r_g=1.0, r_i=0.0)  # r_i = 0: every token is "needed"
    greedy(lm, ids, modality, image_id, strict, 0)
    greedy(lm, ids, modality, image_id, loose, 0)
    assert strict.layers[0].held < ids.numel()
    assert loose.layers[0].held == ids.numel()


def test_without_after_layer_the_kept_set_is_applied_at_end_step(lm):
    """transformers' own forward has no between-layer hook: every layer is compacted at the end."""
    ids, modality, image_id = fake_prompt(before=5, images=30, after=7)
    ours = evicting_cache(lm, "hae", visual_keep=0.4, r_i=0.9)
    greedy(lm, ids, modality, image_id, ours, 0)
    theirs = evicting_cache(lm, "hae", visual_keep=0.4, r_i=0.9)
    theirs.begin_tokens(modality, image_id)
    with torch.no_grad():
        lm(ids[None], cache=theirs, use_cache=True)
    theirs.end_step()
    for a, b in zip(ours.layers, theirs.layers):
        assert torch.equal(a.token_index, b.token_index)
        assert torch.equal(a.modality, b.modality)
    # layers up to the scoring layer computed the same rows either way
    torch.testing.assert_close(theirs.layers[0].keys, ours.layers[0].keys)
    torch.testing.assert_close(theirs.layers[1].keys, ours.layers[1].keys)
