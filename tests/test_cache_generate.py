"""transformers' own `generate` drives the cache without begin_tokens / end_step / after_layer."""

import pytest
import torch

from cache_helpers import dynamic_cache, evicting_cache, fake_prompt, greedy, tiny_lm

NEW = 16


@pytest.fixture(scope="module")
def prompt():
    return fake_prompt(before=6, images=24, after=8, sep_every=0)


def _generate(lm, ids, cache):
    with torch.no_grad():
        out = lm.generate(
            ids[None], cache=cache, max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW,
            output_scores=True, return_dict_in_generate=True, pad_token_id=0,
        )
    return out.sequences[0, ids.numel():].tolist(), torch.stack(out.scores)[:, 0]


def test_full_cache_under_generate_matches_dynamic_cache(lm, prompt):
    ids = prompt[0]
    ref_tokens, ref_scores = _generate(lm, ids, dynamic_cache(lm))
    cache = evicting_cache(lm, "full")
    tokens, scores = _generate(lm, ids, cache)
    assert tokens == ref_tokens
    torch.testing.assert_close(scores, ref_scores, atol=1e-5, rtol=0)
    assert cache.step == NEW and cache.tokens_fed == ids.numel() + NEW - 1
    assert [layer.held for layer in cache.layers] == [ids.numel() + NEW - 1] * 4


@pytest.mark.parametrize("policy, params", [("streaming", {"budget": 12, "sink": 4}), ("h2o", {"budget": 14})])
def test_decode_evicting_policy_under_generate_keeps_absolute_positions(lm, prompt, policy, params):
    """Same tokens as our own loop with the same policy: positions stayed absolute after eviction."""
    ids = prompt[0]
    cache = evicting_cache(lm, policy, **params)
    tokens, _ = _generate(lm, ids, cache)
    ours = evicting_cache(lm, policy, **params)
    ours_tokens, _, _ = greedy(lm, ids, torch.zeros_like(prompt[1]), prompt[2] * 0, ours, NEW - 1)
    assert tokens[: NEW - 1] == ours_tokens
    assert tokens != _generate(lm, ids, dynamic_cache(lm))[0], "eviction should change the output"
    budget = params["budget"]
    for theirs, mine in zip(cache.layers, ours.layers):
        assert theirs.held == budget
        assert torch.equal(theirs.token_index, mine.token_index)
        assert int(theirs.token_index.max()) == ids.numel() + NEW - 2
    if policy == "streaming":
        assert cache.layers[0].token_index[0, :4].tolist() == [0, 1, 2, 3]


def test_plain_sdpa_generate_ends_steps_lazily(prompt):
    """With "sdpa" nothing is observed; each step still ends when the next forward starts."""
    plain = tiny_lm(attention="sdpa")
    ids = prompt[0]
    hooked = evicting_cache(tiny_lm(), "streaming", budget=12)
    lazy = evicting_cache(plain, "streaming", budget=12)
    assert _generate(plain, ids, lazy)[0] == _generate(tiny_lm(), ids, hooked)[0]
    assert lazy.step == NEW - 1  # the last forward ends at the next use of the cache
    assert lazy.get_seq_length() == 12 and lazy.step == NEW


def test_active_cache_is_cleared_and_not_kept_alive(lm, prompt):
    import gc
    import weakref

    from hae_cli.cache.attention import _ACTIVE

    cache = evicting_cache(lm, "full")
    _generate(lm, prompt[0], cache)
    assert _ACTIVE.get() is None
    plain = tiny_lm(attention="sdpa")
    cache = evicting_cache(plain, "full")
    _generate(plain, prompt[0], cache)
    assert _ACTIVE.get() is not None  # nothing consumed it under plain sdpa ...
    ref = weakref.ref(cache)
    del cache
    gc.collect()
    assert ref() is None  # ... but it does not keep the cache alive


def test_tags_given_before_generate_reach_the_prefill_decision(lm):
    """begin_tokens before `generate` tags the prompt; HAE's kept set then equals our loop's."""
    ids, modality, image_id = fake_prompt(before=6, images=24, after=8)
    params = dict(budget=500, visual_keep=0.4, r_i=0.9)
    cache = evicting_cache(lm, "hae", **params)
    cache.begin_tokens(modality, image_id)
    _generate(lm, ids, cache)
    ours = evicting_cache(lm, "hae", **params)
    greedy(lm, ids, modality, image_id, ours, 0)
    kept = ours.layers[0].token_index
    assert kept.shape[1] < ids.numel()
    for layer in cache.layers:  # no hidden pruning under generate: every layer compacted at the end
        assert torch.equal(layer.token_index[:, : kept.shape[1]], kept)
        assert layer.token_index[0, kept.shape[1] :].tolist() == list(range(ids.numel(), ids.numel() + NEW - 1))
    assert cache.step == NEW
