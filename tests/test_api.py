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
    from hae_cli.model.image import load_image, preprocess

    features = loaded.model.image_embeddings([preprocess(load_image(image), loaded.image_config)])
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
    assert len(payload["final_cache"]["layers"]) == loaded.num_layers


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
