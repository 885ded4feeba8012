"""A conversation's images are compressed before any question; what Stage 1 drops goes to a
reserve, and a new turn's question, fed first as a probe, brings back what it attends to.

Checked on a tiny Phi-3: the tokens restored are exactly those HAE's rule picks from the
question's attention computed here independently (layer 0's queries and keys depend only on a
token and its position); through the turns, every layer holds its budget; and the logits of
prefill, probe, swap, question and answer equal those of a full cache that masks, at each step,
what the evicting cache did not hold."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from cache_helpers import HEAD_DIM, HEADS, KV_HEADS, fake_prompt, hide_keys, layer0_qkv, tiny_lm
from hae_cli.cache import EvictingCache, Modality
from hae_cli.cache.policies import LayerView, QuestionAttention, make_policy
from hae_cli.model.decoder import run_decoder

ATOL = 2e-5
IMAGE_PROMPT = dict(before=6, images=36, after=0)  # images last: the question comes in a later turn
QUESTIONS = [torch.tensor([11, 23, 35, 47, 59, 71]), torch.tensor([13, 29, 31, 61, 67, 83, 89])]
ANSWER_STEPS = 5


def params(**extra):
    return {**dict(score_layer=0, visual_keep=0.3, r_i=0.95, image_floor=0.0, sink=2, recent=4, buffer=4), **extra}


def converse(lm, cache, questions=QUESTIONS, after_step=None, mask_fn=None, before_step=None):
    """Images as the prefill, then each question (probed first where the policy asks) and a few
    greedy answer tokens. Returns the logits of every real forward; `before_step(step, cache)` and
    `after_step(step, cache)` run around each."""
    ids, modality, image_id = fake_prompt(**IMAGE_PROMPT, sep_every=6)
    embed = lm.model.embed_tokens
    logits, step, position = [], 0, 0

    def forward(tokens, tags, probe=False):
        nonlocal step, position
        q = tokens.numel()
        positions = torch.arange(position, position + q)
        if before_step is not None and not probe:
            before_step(step, cache)
        if hasattr(cache, "begin_tokens"):
            cache.begin_tokens(*tags, probe=probe)
        if mask_fn is None:
            out = run_decoder(lm, embed(tokens)[None], positions, cache).logits
        else:
            out = masked_forward(lm, embed(tokens)[None], positions, cache, lambda layer, q, kv: mask_fn(step, layer, q, kv))
        if probe:
            cache.end_probe()
            return
        if hasattr(cache, "end_step"):
            cache.end_step()
        position += q
        if after_step is not None:
            after_step(step, cache)
        step += 1
        logits.append(out[0, -1])

    with torch.no_grad():
        forward(ids, (modality, image_id))
        for question in questions:
            text = (torch.full((question.numel(),), int(Modality.TEXT), dtype=torch.int8),
                    torch.zeros(question.numel(), dtype=torch.int16))
            if getattr(getattr(cache, "policy", None), "wants_question_probe", lambda: False)():
                forward(question, text, probe=True)
            forward(question, text)
            for _ in range(ANSWER_STEPS):
                token = torch.tensor([int(logits[-1].argmax())])
                forward(token, (torch.tensor([int(Modality.GENERATED)], dtype=torch.int8), torch.zeros(1, dtype=torch.int16)))
    return torch.stack(logits)


def test_the_prefill_sets_aside_what_stage_1_drops_and_the_question_brings_back_what_it_attends():
    lm = tiny_lm(layers=1, seed=3)
    cache = EvictingCache("hae", 1, **params())
    ids, _, _ = fake_prompt(**IMAGE_PROMPT, sep_every=6)
    length = ids.numel()
    probes = []

    def seen(step, cache):  # before each real forward: after the prefill, then after the question's swap
        layer, reserve = cache.layers[0], cache.asides[0].reserve
        if step == 1:
            assert len(reserve) > 0
        if step in (1, 2):
            probes.append((layer.token_index[0].clone(), reserve.token_index.clone()))

    def prefilled(step, cache):
        if step == 0:
            layer, reserve = cache.layers[0], cache.asides[0].reserve
            assert len(reserve) > 0 and layer.held + len(reserve) == length
            probes.insert(0, (layer.token_index[0].clone(), reserve.token_index.clone()))

    converse(lm, cache, questions=QUESTIONS[:1], after_step=prefilled, before_step=seen)
    (held, reserved), (after_swap, _) = probes[0], probes[1]
    restores = [e for e in cache.events if e.stage == "turn" and e.action == "restored"]
    assert restores, "the question should bring something back"

    # independently: the question's attention at layer 0 over the held keys and the reserve's
    tokens = torch.cat([ids, QUESTIONS[0]])
    queries, keys, _ = layer0_qkv(lm, tokens, torch.arange(tokens.numel()))
    scale = HEAD_DIM**-0.5
    group = HEADS // KV_HEADS
    q = queries[0, :, length:]  # [H, r, D]
    visible = torch.cat([held, torch.arange(length, tokens.numel())])
    k_visible = keys[0][:, visible].repeat_interleave(group, dim=0)  # [H, n, D]
    logits = q @ k_visible.transpose(-1, -2) * scale
    rows = torch.arange(QUESTIONS[0].numel())
    causal = visible[None, :] <= (length + rows)[:, None]
    logits = logits.masked_fill(~causal[None], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    probs = (logits - lse).exp()[..., : held.numel()]
    k_reserved = keys[0][:, reserved].repeat_interleave(group, dim=0)
    what_if = ((q @ k_reserved.transpose(-1, -2) * scale) - lse).exp()

    def per_kv_head(p):
        return p.sum(dim=1).reshape(KV_HEADS, group, -1).mean(dim=1)

    question = QuestionAttention(per_kv_head(probs), per_kv_head(what_if), torch.zeros(KV_HEADS, 0),
                                 probs.amax(dim=1), what_if.amax(dim=1), torch.zeros(HEADS, 0))
    _, modality, _ = fake_prompt(**IMAGE_PROMPT, sep_every=6)
    view = LayerView(torch.zeros(KV_HEADS, held.numel()), modality[held], None, torch.zeros(0, dtype=torch.int8),
                     modality[reserved])
    swap = make_policy("hae", **params()).turn_swap(0, view, question, cache.layers[0].budget)
    expected_back = set(reserved[swap.from_reserve].tolist())
    expected_out = set(held[swap.out].tolist())
    after = set(after_swap.tolist())
    assert expected_back and after - set(held.tolist()) == expected_back
    assert not expected_out & after
    assert int(sum(sum(e.counts.values()) for e in restores)) == len(expected_back)


def test_budgets_hold_and_evicting_and_restoring_equal_masking_through_turns():
    lm = tiny_lm(layers=3, seed=1)
    ids, _, _ = fake_prompt(**IMAGE_PROMPT, sep_every=6)
    held_before: list[list[set[int]]] = []  # what each layer holds as each real forward starts

    def snapshot(step, cache):
        held_before.append([set(layer.token_index[0].tolist()) if layer.held else set() for layer in cache.layers])

    def check(step, cache):
        for layer in cache.layers:
            assert layer.budget is not None and layer.held <= layer.budget + 4

    cache = EvictingCache("hae", 3, **params(budget=24))
    ours = converse(lm, cache, after_step=check, before_step=snapshot)
    actions = {(e.stage, e.action) for e in cache.events}
    assert {("prefill", "reserved"), ("turn", "restored"), ("decode", "binned")} <= actions, actions

    def mask(step, layer, q, kv):
        if step == 0:
            return None  # the prefill: every layer computes every row (the reserve is set aside after)
        hidden = set(range(kv - q)) - held_before[step][layer]
        return hide_keys(q, kv, hidden) if hidden else None

    reference = converse(lm, DynamicCache(), mask_fn=mask)
    torch.testing.assert_close(ours, reference, atol=ATOL, rtol=0)


def test_the_probe_leaves_nothing_behind():
    """The tokens fed count the question once, and no layer holds a row of the probe."""
    lm = tiny_lm(layers=3, seed=1)
    cache = EvictingCache("hae", 3, **params(budget=24))
    converse(lm, cache, questions=QUESTIONS[:1])
    ids, _, _ = fake_prompt(**IMAGE_PROMPT, sep_every=6)
    assert cache.tokens_fed == ids.numel() + QUESTIONS[0].numel() + ANSWER_STEPS
    for layer in cache.layers:
        index = layer.token_index[0]
        assert bool((index[1:] > index[:-1]).all()) and int(index.max()) < cache.tokens_fed


@pytest.mark.parametrize("setting", [dict(reserve="off"), dict(turn_restore=False)])
def test_the_ablations_bring_nothing_back_from_a_reserve(setting):
    lm = tiny_lm(layers=3, seed=1)
    cache = EvictingCache("hae", 3, **params(budget=24, **setting))
    converse(lm, cache)
    if setting.get("reserve") == "off":  # pruned rows are deleted; a question may still restore from the bin
        assert all(len(aside.reserve) == 0 for aside in cache.asides)
        assert not any(e.action == "reserved" and e.stage == "prefill" for e in cache.events)
    else:
        assert not any(e.stage == "turn" for e in cache.events)


def masked_forward(lm, embeds, positions, cache, mask_fn):
    """The layers one by one on a DynamicCache, each with its own mask (`mask_fn(layer, q, kv)`)."""
    backbone, hidden = lm.model, embeds
    cos, sin = backbone.rotary_emb(hidden, position_ids=positions[None])
    q = hidden.shape[1]
    for layer_idx, layer in enumerate(backbone.layers):
        hidden = layer(hidden, attention_mask=mask_fn(layer_idx, q, cache.get_seq_length(layer_idx) + q),
                       position_ids=positions[None], cache=cache, use_cache=True, position_embeddings=(cos, sin))
    return lm.lm_head(backbone.norm(hidden))


def test_each_images_floor_stays_held_through_the_turns_and_only_the_rest_is_swapped():
    """`turn_floor`: when each question is fed, the image tokens held are the prefill's floor first
    (all of it, or, where rounds left fewer image tokens held than the floor has, only floor
    tokens); without it the question's attention alone decides, and takes some of them."""
    question_steps = [1 + turn * (1 + ANSWER_STEPS) for turn in range(len(QUESTIONS))]

    def run(turn_floor: bool):
        lm = tiny_lm(layers=2, seed=5)
        cache = EvictingCache("hae", 2, **params(image_floor=0.3, visual_keep=0.1, turn_floor=turn_floor))
        held_each_turn = []

        def before(step, cache):
            if step in question_steps:
                held_each_turn.append([set(layer.token_index[0][layer.modality[0] == Modality.IMAGE].tolist())
                                       for layer in cache.layers])

        converse(lm, cache, before_step=before)
        assert any(e.stage == "turn" and e.action == "restored" for e in cache.events)
        return cache, held_each_turn

    cache, held_each_turn = run(True)
    floor = set(cache.asides[0].reserve.protected.tolist())
    _, modality, _ = fake_prompt(**IMAGE_PROMPT, sep_every=6)
    image_tokens = int((modality == Modality.IMAGE).sum())
    assert len(floor) >= 0.3 * image_tokens and all(set(aside.reserve.protected.tolist()) == floor for aside in cache.asides)
    assert all(floor <= held or held <= floor for turn in held_each_turn for held in turn)
    unprotected, held_without = run(False)
    assert unprotected.asides[0].reserve.protected.numel() == 0
    assert not all(floor <= held or held <= floor for turn in held_without for held in turn), \
        "the question alone takes floor tokens"
