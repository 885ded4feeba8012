"""With nothing to evict, the evicting cache must be invisible: same tokens, same logits."""

import pytest
import torch

from cache_helpers import dynamic_cache, evicting_cache, fake_prompt, greedy, tiny_lm

STEPS = 20

# Each policy with a budget above the sequence (58 tokens + 20) and its prefill pruning off.
ROOMY = {
    "full": {},
    "hae": {"budget": 500, "r_g": 0.0},
    "hae_broadcast": {"budget": 500, "r_g": 0.0, "broadcast": True},
    "streaming": {"budget": 500},
    "h2o": {"budget": 500},
    "snapkv": {"budget": 500},
    "fastv": {"drop_ratio": 0.0},
    "mustdrop": {"budget": 500, "r_g": 0.0},
}


@pytest.fixture(scope="module")
def reference(lm):
    ids, modality, image_id = fake_prompt(before=6, images=36, after=16)
    tokens, logits, _ = greedy(lm, ids, modality, image_id, dynamic_cache(lm), STEPS)
    assert len(set(tokens)) > 3, "the tiny model should not repeat one token"
    return (ids, modality, image_id), tokens, logits


@pytest.mark.parametrize("case", sorted(ROOMY))
def test_policy_with_room_is_exact(lm, reference, case):
    prompt, ref_tokens, ref_logits = reference
    params = dict(ROOMY[case])
    policy = case.split("_")[0]
    cache = evicting_cache(lm, policy, **params)
    tokens, logits, _ = greedy(lm, *prompt, cache, STEPS)
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert not [e for e in cache.events if e.action != "restored"]
    assert all(layer.tokens_held == prompt[0].numel() + STEPS for layer in cache.stats().layers)


def test_hae_sdpa_output_equals_plain_sdpa(reference):
    """Observing attention must not change it."""
    prompt, ref_tokens, ref_logits = reference
    plain = tiny_lm(attention="sdpa")
    tokens, logits, _ = greedy(plain, *prompt, dynamic_cache(plain), STEPS)
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, atol=1e-6, rtol=0)
