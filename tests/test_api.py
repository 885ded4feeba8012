"""The Python API: run = prepare + run_prepared, feature reuse, results that add up."""

import json

import pytest
import torch
from PIL import Image

from hae_cli import api
from hae_cli.errors import ConfigError, InputError


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return api.load_model(str(tiny_checkpoint))


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "shape.png"
    Image.new("RGB", (64, 48), (20, 200, 30)).save(path)
    return path


def test_run_is_prepare_then_run_prepared(loaded, image):
    direct = api.run(loaded, [image], "what color is the shape?", policy="hae", max_new_tokens=6, seed=1)
    prepared = api.prepare(loaded, [image], "what color is the shape?")
    again = api.run_prepared(loaded, prepared, policy="hae", max_new_tokens=6, seed=1)
    assert direct.token_ids == again.token_ids and direct.text == again.text


def test_precomputed_image_features_give_the_same_embeddings(loaded, image):
    from hae_cli.model.image_file import load_image
    from hae_cli.model.phi3v.image import preprocess

    features = loaded.network.image_embeddings([preprocess(load_image(image), loaded.image_config)])
    fresh = api.prepare(loaded, [image], "what shape is it?")
    reused = api.prepare(loaded, [image], "what shape is it?", image_features=features)
    assert torch.equal(fresh.embeds, reused.embeds)


def test_full_cache_result_adds_up(loaded, image):
    result = api.run(loaded, [image], "what color is the shape?", policy="full", max_new_tokens=5)
    assert result.kv_bytes_final == result.full_cache_bytes_final > 0
    # prefill + one per decode forward (the last token is fed only if a stop token follows it)
    assert len(result.steps) in (result.decode_tokens, result.decode_tokens + 1)
    assert [s.step for s in result.steps] == list(range(len(result.steps)))
    assert result.prompt_tokens["image"] > 0 and result.prompt_tokens["separator"] > 0
    payload = json.loads(json.dumps(result.to_json()))
    assert payload["kv_bytes"]["final"] == result.kv_bytes_final
    # the full cache's storage grows in chunks: it holds the rows and room for more
    assert payload["kv_bytes"]["allocated_final"] >= payload["kv_bytes"]["final"]
    assert payload["kv_bytes"]["allocated_peak"] >= payload["kv_bytes"]["allocated_final"]
    assert len(payload["final_cache"]["layers"]) == loaded.num_layers
    assert all(layer["bytes_allocated"] >= layer["bytes_held"] for layer in payload["final_cache"]["layers"])


def test_bad_options_fail_before_the_images_are_read(loaded, tmp_path):
    missing = tmp_path / "nowhere.png"
    with pytest.raises(ConfigError, match="budget"):
        api.run(loaded, [missing], "q", policy="hae", policy_params={"budget": 0})
    with pytest.raises(ConfigError, match="max_new_tokens"):
        api.run(loaded, [missing], "q", max_new_tokens=0)
    with pytest.raises(InputError, match="image not found"):
        api.run(loaded, [missing], "q")
    with pytest.raises(InputError, match="no images"):
        api.run(loaded, [], "q")


def _generate_split(loaded, prepared, policy, params, context_length):
    from hae_cli.model.generate import SamplingConfig, generate

    cache = api.make_cache(loaded, policy, params)
    tokens = prepared.tokens
    result = generate(loaded, tokens, prepared.embeds, cache, SamplingConfig(max_new_tokens=6), stop_ids=set(),
                      context_length=context_length)
    return result, cache


def test_question_after_the_cached_images_changes_nothing_under_the_full_cache(loaded, image):
    """Feeding the question as a second forward is exact: positions and the chunk's causal
    mask line up with a single prefill."""
    prepared = api.prepare(loaded, [image, image], "what color is the shape?")
    split = prepared.tokens.after_images()
    assert 0 < split < prepared.embeds.shape[1]
    assert int(prepared.tokens.image_id[split - 1]) == 2 and int(prepared.tokens.image_id[split:].max()) == 0
    whole, _ = _generate_split(loaded, prepared, "full", None, None)
    parts, cache = _generate_split(loaded, prepared, "full", None, split)
    torch.testing.assert_close(parts.first_logits, whole.first_logits, atol=1e-5, rtol=0)
    assert parts.token_ids == whole.token_ids
    assert cache.layers[0].token_index[0].tolist() == list(range(cache.tokens_fed))


def test_question_after_the_cached_images_is_kept_whole_after_pruning(loaded, image):
    """HAE prunes the images before the question exists; the question's rows then all stay,
    tagged as text, at their own positions after the surviving context. (r_i = 1: on a random
    model nearly every token clears a lower bar as "needed".)"""
    from hae_cli.cache.modality import Modality

    prepared = api.prepare(loaded, [image], "what shape is in the image?")
    split = prepared.tokens.after_images()
    length = prepared.embeds.shape[1]
    steps = []
    api_result = api.run_prepared(
        loaded, prepared, policy="hae", policy_params={"visual_keep": 0.3, "r_i": 1.0}, max_new_tokens=1,
        context_length=split, on_step=steps.append,
    )
    context_held = [layer.tokens_held for layer in steps[0].layers]
    assert max(context_held) < split, "the images should have been pruned before the question"
    assert [layer.tokens_held for layer in steps[1].layers] == [h + length - split for h in context_held]
    _, cache = _generate_split(loaded, prepared, "hae", {"visual_keep": 0.3, "r_i": 1.0}, split)
    fed_after = cache.tokens_fed - split  # the question's rows, then the generated ones
    for layer in cache.layers:
        assert layer.token_index[0, -fed_after:].tolist() == list(range(split, cache.tokens_fed))
        tags = layer.modality[0, -fed_after:].tolist()
        assert tags == [Modality.TEXT] * (length - split) + [Modality.GENERATED] * (cache.tokens_fed - length)
    assert api_result.token_ids


def test_context_length_must_leave_a_question(loaded, image):
    prepared = api.prepare(loaded, [image], "what shape?")
    with pytest.raises(ValueError, match="context_length"):
        _generate_split(loaded, prepared, "full", None, prepared.embeds.shape[1])
