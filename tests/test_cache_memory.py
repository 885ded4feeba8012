"""Memory: bytes held are tokens x bytes per token; the storage is written in place, sized to
budget + buffer once the prompt is in, and the prompt-size storage is released."""

import gc
import weakref

import torch

from cache_helpers import HEAD_DIM, KV_HEADS, evicting_cache, fake_prompt, greedy, tiny_lm
from hae_cli.cache import Modality
from hae_cli.cache.layer import GROWTH_ROWS, GROWTH_SHARE, EvictingLayer
from hae_cli.cache.recycle_bin import RecycleBin, TokenRows
from hae_cli.cache.rounds import evict_to_bin, restore
from hae_cli.model.decoder import run_decoder

BYTES_PER_TOKEN = 2 * KV_HEADS * HEAD_DIM * 4  # K and V, float32


def _storage_refs(layer):
    return weakref.ref(layer.keys.untyped_storage()), weakref.ref(layer.values.untyped_storage())


def _addresses(layer):
    return layer.keys.data_ptr(), layer.values.data_ptr(), layer.token_index.data_ptr(), layer.scores.data_ptr()


def test_bytes_held_match_tokens_held_at_every_step():
    lm = tiny_lm()
    cache = evicting_cache(lm, "hae", budget=20, buffer=4, recent=4)
    seen = []

    def check(step, cache, fed):
        stats = cache.stats()
        assert stats.step == step
        for layer, layer_stats in zip(cache.layers, stats.layers):
            assert layer_stats.bytes_held == layer.held * BYTES_PER_TOKEN
            assert layer_stats.bytes_allocated == (20 + 4) * BYTES_PER_TOKEN
            assert layer_stats.tokens_held == layer.held
            assert layer_stats.bin_bytes == len(cache.asides[layer_stats.layer].bin) * BYTES_PER_TOKEN
            assert sum(layer_stats.tokens_by_modality.values()) == layer.held
        assert stats.full_cache_bytes == len(fed) * BYTES_PER_TOKEN * len(cache.layers)
        seen.append(stats.bytes_held)

    greedy(lm, *fake_prompt(), cache, 16, after_step=check)
    assert max(seen) <= (20 + 4) * BYTES_PER_TOKEN * 4
    assert seen[-1] < 38 * BYTES_PER_TOKEN * 4, "the cache ends smaller than the prompt"


def test_many_rounds_write_in_place_within_the_bound():
    """60 decode steps under HAE with a bin (15 rounds that evict, restore and delete): every
    layer keeps one storage of budget + buffer rows, and held bytes are the formula throughout."""
    lm = tiny_lm()
    cache = evicting_cache(lm, "hae", budget=16, buffer=4, recent=4, sink=2)
    addresses = {}

    def check(step, cache, fed):
        for idx, layer in enumerate(cache.layers):
            assert layer.capacity == 16 + 4 and layer.bytes_allocated == (16 + 4) * BYTES_PER_TOKEN
            assert layer.bytes_held == layer.held * BYTES_PER_TOKEN <= layer.bytes_allocated
            assert layer.keys.shape[2] == layer.values.shape[2] == layer.token_index.shape[1] == layer.held
            assert addresses.setdefault(idx, _addresses(layer)) == _addresses(layer), f"layer {idx} reallocated at step {step}"

    greedy(lm, *fake_prompt(), cache, 60, after_step=check)
    rounds = [e for e in cache.events if e.stage == "decode" and e.layer == 0 and e.action == "binned"]
    assert len(rounds) == 15
    assert any(e.action == "restored" for e in cache.events)


def test_the_prompt_storage_is_released_and_rounds_reuse_the_storage():
    lm = tiny_lm()
    ids, modality, image_id = fake_prompt()
    cache = evicting_cache(lm, "streaming", budget=12, sink=2, buffer=3)
    embed = lm.model.embed_tokens
    with torch.no_grad():
        cache.begin_tokens(modality, image_id)
        run_decoder(lm, embed(ids)[None], torch.arange(ids.numel()), cache)
        refs = [_storage_refs(layer) for layer in cache.layers]
        assert all(layer.capacity == 38 for layer in cache.layers), "the prompt, exactly"
        gc.collect()
        assert all(k() is not None and v() is not None for k, v in refs), "alive before the round"
        cache.end_step()  # the prefill round: 38 tokens -> 12, storage for 12 + 3
        gc.collect()
        assert all(k() is None and v() is None for k, v in refs), "the prompt-size storage must be freed"
        for layer in cache.layers:
            assert layer.bytes_held == 12 * BYTES_PER_TOKEN and layer.bytes_allocated == 15 * BYTES_PER_TOKEN
        addresses = [_addresses(layer) for layer in cache.layers]
        # decode: 12 -> 15 rows, then one round back to 12, all in the same storage
        for step in range(3):
            position = torch.tensor([ids.numel() + step])
            cache.begin_tokens(torch.tensor([int(Modality.GENERATED)], dtype=torch.int8))
            run_decoder(lm, embed(torch.tensor([[5]])), position, cache)
            cache.end_step()
            assert [_addresses(layer) for layer in cache.layers] == addresses
    assert [layer.held for layer in cache.layers] == [12] * 4


def test_a_prefill_decision_frees_the_pruned_rows_at_once():
    """HAE's index broadcasting prunes the prompt at its scoring layer: the layers it compacts
    keep storage for the kept rows only, before the prompt's forward is even done."""
    lm = tiny_lm()
    ids, modality, image_id = fake_prompt()
    cache = evicting_cache(lm, "hae", score_layer=1, visual_keep=0.4, r_i=0.9)
    with torch.no_grad():
        cache.begin_tokens(modality, image_id)
        run_decoder(lm, lm.model.embed_tokens(ids)[None], torch.arange(ids.numel()), cache)
        assert cache.layers[0].held < ids.numel(), "the prompt was pruned"
        for layer in cache.layers:
            assert layer.capacity == layer.held and layer.bytes_allocated == layer.bytes_held
        cache.end_step()


def test_a_forward_past_the_bound_grows_the_storage_until_the_next_round():
    layer = EvictingLayer(0)
    keys = torch.randn(1, 2, 30, 4)
    tags = torch.zeros(30, dtype=torch.int8), torch.zeros(30, dtype=torch.int16)
    layer.append(keys[:, :, :10], keys[:, :, :10], torch.arange(10), tags[0][:10], tags[1][:10])
    layer.limit_rows(12)
    assert layer.capacity == 12 and layer.held == 10
    layer.append(keys[:, :, 10:16], keys[:, :, 10:16], torch.arange(10, 16), tags[0][:6], tags[1][:6])
    assert layer.capacity == 16, "a several-token forward gets the rows it needs"
    torch.testing.assert_close(layer.keys, keys[:, :, :16])
    layer.compact(torch.arange(6, 16))
    assert layer.capacity == 12 and layer.held == 10, "back to the bound"
    torch.testing.assert_close(layer.keys, keys[:, :, 6:16])
    assert layer.token_index[0].tolist() == list(range(6, 16))


def test_a_layer_without_a_bound_grows_in_chunks():
    layer = EvictingLayer(0)
    row = torch.randn(1, 2, 1, 4)
    tags = torch.zeros(1, dtype=torch.int8), torch.zeros(1, dtype=torch.int16)
    layer.append(torch.randn(1, 2, 100, 4), torch.randn(1, 2, 100, 4), torch.arange(100), *(t.expand(100) for t in tags))
    layer.limit_rows(None)
    assert layer.capacity == 100 + GROWTH_ROWS, "room to grow once the prompt is in"
    grown = set()
    for position in range(100, 1100):
        layer.append(row, row, torch.tensor([position]), *tags)
        grown.add(layer.capacity)
        assert layer.held <= layer.capacity <= layer.held + max(GROWTH_ROWS, layer.held * GROWTH_SHARE) + 1
    assert len(grown) <= 16, f"{len(grown)} reallocations for 1,000 appends"
    assert layer.token_index[0].tolist() == list(range(1100))


def test_compact_and_bin_write_into_the_same_storage():
    layer = EvictingLayer(0)
    keys = torch.randn(1, 2, 10, 4)
    tags = torch.zeros(10, dtype=torch.int8), torch.zeros(10, dtype=torch.int16)
    layer.append(keys, keys + 1, torch.arange(10), *tags)
    layer.limit_rows(10)
    addresses = _addresses(layer)
    layer.compact(torch.tensor([0, 2, 4, 6, 8]))
    assert _addresses(layer) == addresses
    assert layer.bytes_held == 5 * 2 * 2 * 4 * 4 and layer.bytes_allocated == 10 * 2 * 2 * 4 * 4
    bin_ = RecycleBin()
    evict_to_bin(layer, bin_, torch.tensor([1, 3]))
    assert _addresses(layer) == addresses and layer.held == 3 and len(bin_) == 2
    assert bin_.nbytes == 2 * 2 * 2 * 4 * 4
    torch.testing.assert_close(bin_.keys, keys[:, :, [2, 6]])
    restore(layer, bin_, torch.tensor([1]))
    assert _addresses(layer) == addresses
    assert layer.token_index[0].tolist() == [0, 4, 6, 8] and bin_.token_index.tolist() == [2]
    torch.testing.assert_close(layer.keys, keys[:, :, [0, 4, 6, 8]])
    torch.testing.assert_close(layer.values, keys[:, :, [0, 4, 6, 8]] + 1)


def test_recycle_bin_bookkeeping():
    layer = EvictingLayer(0)
    keys = torch.randn(1, 2, 6, 4)
    modality = torch.tensor([0, 1, 1, 2, 1, 3], dtype=torch.int8)
    layer.append(keys, keys, torch.arange(10, 16), modality, torch.tensor([0, 1, 1, 1, 1, 0], dtype=torch.int16))
    layer.scores = torch.arange(12, dtype=torch.float32).reshape(2, 6)
    bin_ = RecycleBin()
    evict_to_bin(layer, bin_, torch.tensor([1, 3, 4]))
    assert isinstance(bin_, RecycleBin) and not bin_.keys.is_cuda
    assert bin_.token_index.tolist() == [11, 13, 14]
    assert bin_.modality.tolist() == [1, 2, 1] and bin_.image_id.tolist() == [1, 1, 1]
    assert bin_.scores.tolist() == [[1.0, 3.0, 4.0], [7.0, 9.0, 10.0]]
    bin_.age()
    assert bin_.rounds.tolist() == [1, 1, 1]
    assert bin_.delete(torch.tensor([0])).tolist() == [1]
    rows = restore(layer, bin_, torch.tensor([1]))
    assert rows.token_index[:, 0].tolist() == [14, 14]
    assert layer.token_index[0].tolist() == [10, 12, 14, 15]
    assert layer.modality[0].tolist() == [0, 1, 1, 3]
    assert layer.scores[:, 2].tolist() == [4.0, 10.0]
    assert bin_.token_index.tolist() == [13]


def test_insert_merges_rows_in_position_order_in_every_head():
    """Heads holding different rows each get the incoming rows at their own places (rows given
    out of position order), and every tag, score and K/V row stays with its position."""
    layer = EvictingLayer(0)
    keys = torch.arange(10, dtype=torch.float32)[None, None, :, None].expand(1, 2, 10, 3).contiguous()
    tags = torch.arange(10, dtype=torch.int8), torch.arange(10, dtype=torch.int16)
    layer.append(keys, -keys, torch.arange(10), *tags)
    layer.scores = torch.arange(10, dtype=torch.float32).expand(2, 10) * 0.5
    layer.compact(torch.tensor([[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]))
    incoming = [[9, 1], [4, 0]]  # per head, not in position order
    rows = TokenRows(
        keys=torch.tensor(incoming, dtype=torch.float32)[None, :, :, None].expand(1, 2, 2, 3),
        values=-torch.tensor(incoming, dtype=torch.float32)[None, :, :, None].expand(1, 2, 2, 3),
        token_index=torch.tensor(incoming),
        modality=torch.tensor(incoming, dtype=torch.int8),
        image_id=torch.tensor(incoming, dtype=torch.int16),
        scores=torch.tensor(incoming, dtype=torch.float32) * 0.5,
    )
    layer.insert(rows)
    expected = torch.tensor([[0, 1, 2, 4, 6, 8, 9], [0, 1, 3, 4, 5, 7, 9]])
    assert torch.equal(layer.token_index, expected)
    assert torch.equal(layer.modality, expected.to(torch.int8)) and torch.equal(layer.image_id, expected.to(torch.int16))
    assert torch.equal(layer.scores, expected * 0.5)
    assert torch.equal(layer.keys[0, :, :, 0], expected.float()) and torch.equal(layer.values[0, :, :, 2], -expected.float())
    assert layer.bytes_held == 7 * 2 * 2 * 3 * 4
