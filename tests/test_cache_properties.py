"""Invariants of the evicting cache over random prompts, budgets and policies (Hypothesis).

After every step, in every layer: the size obeys the budget rule exactly (grow by one per
step until `budget + buffer`, then a round brings it to `budget`); protected tokens
survive; every row's position, modality, image id and K/V belong together (layer-0 keys
and values are recomputed from the token fed at that position); the bin obeys its
capacity; bytes held match the rows held, and the storage is budget + buffer rows.
"""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cache_helpers import evicting_cache, fake_prompt, greedy, layer0_keys_values, tiny_lm
from hae_cli.cache import Modality
from hae_cli.cache.policies.capabilities import recycle_bin

LM = tiny_lm(layers=3, seed=1)

POLICY_PARAMS = {
    "hae": lambda d: dict(
        score_layer=d.draw(st.integers(0, 2)),
        buffer=d.draw(st.integers(0, 6)),
        sink=d.draw(st.integers(0, 4)),
        recent=d.draw(st.integers(0, 8)),
        bin_size=d.draw(st.none() | st.integers(0, 6)),
        bin_ttl=d.draw(st.integers(1, 4)),
        gamma=d.draw(st.sampled_from([0.0, 0.5, 0.95, 1.0])),
        broadcast=d.draw(st.booleans()),
        visual_keep=d.draw(st.none() | st.sampled_from([0.3, 0.7])),
        image_floor=d.draw(st.sampled_from([0.0, 0.2, 0.5])),
        floor_score=d.draw(st.sampled_from(["distinct", "attention"])),
    ),
    "mustdrop": lambda d: dict(
        buffer=d.draw(st.integers(0, 6)), sink=d.draw(st.integers(0, 4)), recent=d.draw(st.integers(0, 8))
    ),
    "streaming": lambda d: dict(buffer=d.draw(st.integers(0, 4)), sink=d.draw(st.integers(0, 4))),
    "h2o": lambda d: dict(buffer=d.draw(st.integers(0, 4)), recent=d.draw(st.none() | st.integers(0, 6))),
}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_cache_invariants(data):
    policy = data.draw(st.sampled_from(sorted(POLICY_PARAMS)), label="policy")
    params = POLICY_PARAMS[policy](data)
    before, images, after = data.draw(st.tuples(st.integers(1, 6), st.integers(0, 30), st.integers(1, 8)))
    ids, modality, image_id = fake_prompt(before, images, after, sep_every=data.draw(st.integers(0, 5)))
    num_images = data.draw(st.integers(1, 3)) if images else 0
    for k in range(2, num_images + 1):  # split the block into contiguous images 1..n
        image_id[before + (k - 1) * images // num_images : before + images] = k
    length = ids.numel()
    budget = data.draw(
        st.integers(1, length + 8)
        | st.floats(0.05, 1.0)
        | (st.none() if policy in ("hae", "mustdrop") else st.nothing()),
        label="budget",
    )
    steps = data.draw(st.integers(1, 14), label="steps")
    cache = evicting_cache(LM, policy, budget=budget, **params)
    state = {"held": None}

    def check(step, cache, fed):
        truth_modality = torch.cat([modality, torch.full((steps,), int(Modality.GENERATED), dtype=torch.int8)])
        truth_image = torch.cat([image_id, torch.zeros(steps, dtype=torch.int16)])
        previous = state["held"]
        held_now = []
        stats = cache.stats()
        for idx, layer in enumerate(cache.layers):
            positions = layer.token_index
            # rows ascending, unique, and tags that belong to their position
            assert bool((positions[:, 1:] > positions[:, :-1]).all())
            assert torch.equal(layer.modality, truth_modality[positions])
            assert torch.equal(layer.image_id, truth_image[positions])
            # budget
            if step == 0:
                state.setdefault("prefill_held", []).append(layer.held)
            expected_budget = _expected_budget(budget, length, state["prefill_held"][idx])
            assert layer.budget == expected_budget
            if expected_budget is not None and step > 0:
                grown = previous[idx] + 1
                due = grown > expected_budget and grown >= expected_budget + cache.policy.buffer
                assert layer.held == (expected_budget if due else grown), (step, idx, grown)
                if due:  # protected tokens of that round survived it
                    sink, recent = cache.policy.protected(expected_budget)
                    before_round = state["positions"][idx]
                    newest = torch.full((before_round.shape[0], 1), len(fed) - 1)
                    before_round = torch.cat([before_round, newest], dim=1)
                    tail = before_round[:, before_round.shape[1] - recent :]
                    protected = torch.cat([before_round[:, :sink], tail], dim=1)
                    for head in range(positions.shape[0]):
                        assert bool(torch.isin(protected[head], positions[head]).all())
            if expected_budget is not None:
                assert layer.held <= max(expected_budget, expected_budget + cache.policy.buffer - 1)
            # the bin
            bin_ = cache.asides[idx].bin
            with_bin = recycle_bin(cache.policy)
            capacity = with_bin.bin_capacity(layer.budget) if with_bin and layer.budget is not None else 0
            assert len(bin_) <= capacity
            if len(bin_):
                assert not bool(torch.isin(bin_.token_index, positions.reshape(-1)).any())  # a strided view
                assert torch.equal(bin_.modality, truth_modality[bin_.token_index])
            # what each image holds, as the stats (panel, --json) report it
            per_image = [round(float((layer.image_id == k).sum(dim=1).float().mean())) for k in range(1, num_images + 1)]
            in_bin = [int((truth_image[bin_.token_index] == k).sum()) for k in range(1, num_images + 1)]
            assert stats.layers[idx].tokens_by_image == per_image
            assert stats.image_sizes == [int((image_id == k).sum()) for k in range(1, num_images + 1)]
            assert stats.layers[idx].bin_by_image == in_bin
            # bytes held match rows; the storage stays within budget + buffer once the prompt is in
            assert layer.bytes_held == stats.layers[idx].bytes_held == layer.held * 2 * 2 * 16 * 4
            if expected_budget is not None:
                bound = expected_budget + max(cache.policy.buffer, 1)
                assert layer.capacity == bound and layer.bytes_allocated == bound * 2 * 2 * 16 * 4
            held_now.append(layer.held)
        # K/V rows travel with their positions (layer 0 depends only on token and position)
        layer0, bin0 = cache.layers[0], cache.asides[0].bin
        tokens = torch.tensor(fed)
        for head in range(layer0.token_index.shape[0]):
            keys, values = layer0_keys_values(LM, tokens[layer0.token_index[head]], layer0.token_index[head])
            torch.testing.assert_close(layer0.keys[0, head], keys[0, head], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(layer0.values[0, head], values[0, head], atol=1e-5, rtol=1e-5)
        if len(bin0):
            keys, _ = layer0_keys_values(LM, tokens[bin0.token_index], bin0.token_index)
            torch.testing.assert_close(bin0.keys, keys, atol=1e-5, rtol=1e-5)
        state["held"] = held_now
        state["positions"] = [layer.token_index.clone() for layer in cache.layers]

    greedy(LM, ids, modality, image_id, cache, steps, after_step=check)


def _expected_budget(budget, length, prefill_held):
    if budget is None:
        return prefill_held  # the size after prefill pruning
    if isinstance(budget, float):
        return max(1, int(budget * length))
    return budget
