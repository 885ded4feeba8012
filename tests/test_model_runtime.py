"""The runtime: config split, strict official-layout loading, image embedding order, generation."""

import json
import shutil

import pytest
import torch
from transformers import DynamicCache

from hae_cli.cache.modality import Modality
from hae_cli.errors import CheckpointError, ConfigError, ModelNotFoundError
from hae_cli.model import loading
from hae_cli.model.phi3v import Phi35Vision
from hae_cli.model.phi3v.config import OFFICIAL_CLIP, ModelConfig
from hae_cli.model.generate import SamplingConfig, generate
from hae_cli.model.phi3v.checkpoint import load_checkpoint
from hae_cli.model.loading import pick_device_and_dtype, resolve_model_path
from hae_testing.checkpoints.phi3v import official_config

OFFICIAL_TEXT = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32)


def official_phi35v_config() -> dict:
    raw = official_config(32064, 1, 2, 32000, OFFICIAL_TEXT, OFFICIAL_CLIP)
    del raw["img_processor"]["vision_config"]  # the official file only names the tower
    raw["img_processor"]["image_dim_out"] = 1024
    raw["img_processor"]["num_img_tokens"] = 144
    raw["torch_dtype"] = "bfloat16"
    return raw


def test_official_config_splits_into_native_configs():
    config = ModelConfig.from_dict(official_phi35v_config())
    assert config.text.hidden_size == 3072 and config.text.num_hidden_layers == 32
    assert config.text.rope_parameters["rope_type"] == "longrope"
    assert config.text.rope_parameters["original_max_position_embeddings"] == 4096
    assert len(config.text.rope_parameters["long_factor"]) == 48
    assert config.text._attn_implementation == "hae_sdpa"  # not the file's flash_attention_2
    assert (config.vision.hidden_size, config.vision.num_hidden_layers, config.vision.image_size) == (1024, 24, 336)
    assert config.vision.hidden_act == "quick_gelu" and config.num_img_tokens == 144


@pytest.mark.parametrize("model_type", ["phi3", "llava", None])
def test_other_model_types_are_rejected(model_type):
    raw = official_phi35v_config()
    raw["model_type"] = model_type
    with pytest.raises(CheckpointError, match="model_type"):
        ModelConfig.from_dict(raw)


def test_checkpoint_uses_official_key_names(tiny_checkpoint):
    index = json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())
    keys = set(index["weight_map"])
    for key in [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.qkv_proj.weight",
        "model.layers.1.mlp.gate_up_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
        "model.vision_embed_tokens.glb_GN",
        "model.vision_embed_tokens.sub_GN",
        "model.vision_embed_tokens.img_projection.0.weight",
        "model.vision_embed_tokens.img_projection.2.bias",
        "model.vision_embed_tokens.img_processor.vision_model.pre_layrnorm.weight",
        "model.vision_embed_tokens.img_processor.vision_model.encoder.layers.1.self_attn.k_proj.bias",
        "model.vision_embed_tokens.img_processor.vision_model.embeddings.class_embedding",
    ]:
        assert key in keys, key
    assert len(set(index["weight_map"].values())) == 2  # sharded


def test_round_trip_is_exact(tiny_checkpoint, tiny_loaded, tmp_path):
    from hae_cli.model.phi3v.checkpoint import load_tokenizer
    from hae_testing.checkpoints.phi3v import save_checkpoint

    again = save_checkpoint(tiny_loaded.model, load_tokenizer(tiny_checkpoint), tmp_path / "again", 1)
    reloaded = load_checkpoint(again).model.official_state_dict()
    original = tiny_loaded.model.official_state_dict()
    assert reloaded.keys() == original.keys()
    assert all(torch.equal(reloaded[k], original[k]) for k in original)


def _copy(tiny_checkpoint, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, folder)
    return folder


def _rewrite_shard(folder, mutate):
    from safetensors.torch import load_file, save_file

    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    tensors = load_file(str(folder / shard))
    mutate(tensors)
    save_file(tensors, str(folder / shard))
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard}
    index["weight_map"].update({k: shard for k in tensors})
    index_path.write_text(json.dumps(index))


def test_strict_load_names_a_missing_key(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    removed = []
    _rewrite_shard(folder, lambda t: removed.append(next(iter(t))) or t.pop(removed[0]))
    with pytest.raises(CheckpointError, match="1 missing keys") as info:
        load_checkpoint(folder)
    assert removed[0] in str(info.value)


def test_strict_load_names_an_unexpected_key(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    _rewrite_shard(folder, lambda t: t.__setitem__("model.extra_head.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match="unexpected keys: model.extra_head.weight"):
        load_checkpoint(folder)


def test_strict_load_rejects_a_wrong_shape(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    _rewrite_shard(folder, lambda t: t.update({k: torch.zeros(3) for k in list(t)[:1]}))
    with pytest.raises(CheckpointError, match="has shape"):
        load_checkpoint(folder)


def test_folder_without_weights(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    for file in folder.glob("*.safetensors*"):
        file.unlink()
    with pytest.raises(CheckpointError, match="no weights in"):
        load_checkpoint(folder)


def test_corrupt_shard(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot read weights"):
        load_checkpoint(folder)


def test_wrong_model_type_on_disk(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    raw = json.loads((folder / "config.json").read_text())
    raw["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="'llama' is not supported"):
        load_checkpoint(folder)


def test_model_resolution_errors(tmp_path, monkeypatch):
    with pytest.raises(ModelNotFoundError, match="model folder not found"):
        resolve_model_path(str(tmp_path / "nowhere"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache .*hf download"):
        resolve_model_path("microsoft/Phi-3.5-vision-instruct")
    monkeypatch.setitem(loading.SHIPPED_MODELS, "demo", (tmp_path / "no-demo", "easy-VQA", "scripts/train_demo_model.py"))
    with pytest.raises(ModelNotFoundError, match="demo model is not installed"):
        resolve_model_path("demo")


def test_device_and_dtype_choice():
    assert pick_device_and_dtype("cpu") == (torch.device("cpu"), torch.float32)
    assert pick_device_and_dtype("cpu", "bfloat16")[1] == torch.bfloat16
    with pytest.raises(ConfigError, match="unknown dtype"):
        pick_device_and_dtype("cpu", "float8")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            pick_device_and_dtype("cuda")


def _official_merge(features, h_crop, w_crop, sub_gn, glb_gn):
    """The official sub_glb feature layout, written as the reference code states it."""

    def reshape_2x2(f, hc, wc):
        n, length, c = f.shape
        side = int(length**0.5)
        return (
            f.reshape(n, side, side, c)
            .reshape(n, side // 2, 2, side // 2, 2, c)
            .permute(0, 1, 3, 2, 4, 5)
            .reshape(n, -1, 4 * c)
            .reshape(n // (hc * wc), hc, wc, side // 2, side // 2, -1)
            .permute(0, 1, 3, 2, 4, 5)
            .reshape(n // (hc * wc), hc * side // 2, wc * side // 2, 4 * c)
        )

    def newline(hd):
        n, h, w, dim = hd.shape
        return torch.cat([hd, sub_gn.expand(n, h, -1, -1)], dim=2).reshape(n, -1, dim)

    glb = newline(reshape_2x2(features[:1], 1, 1))[0]
    sub = newline(reshape_2x2(features[1:], h_crop, w_crop))[0]
    return torch.cat([sub, glb_gn.squeeze(0), glb])


@pytest.mark.parametrize("grid", [(1, 1), (2, 3), (3, 1)])
def test_image_tokens_follow_the_official_order_and_separators(tiny_loaded, grid):
    from hae_cli.model.phi3v.image import image_token_modalities, tokens_per_image

    h, w = grid
    vision = tiny_loaded.model.vision
    torch.manual_seed(1)
    pixels = torch.randn(1 + h * w, 3, 336, 336)
    with torch.no_grad():
        ours = vision(pixels, h, w)
        reference = vision.img_projection(
            _official_merge(vision.crop_features(pixels), h, w, vision.sub_GN, vision.glb_GN)
        )
        sub_row = vision.img_projection(vision.sub_GN[0, 0, 0])
        glb_row = vision.img_projection(vision.glb_GN[0, 0])
    assert ours.shape[0] == tokens_per_image(h, w) == (h * w + 1) * 144 + 1 + (h + 1) * 12
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    modality = image_token_modalities(h, w, 12)
    separators = (modality == Modality.SEPARATOR).nonzero().squeeze(-1)
    glb_index = h * 12 * (w * 12 + 1)
    assert glb_index in separators.tolist()
    for index in separators.tolist():
        expected = glb_row if index == glb_index else sub_row
        torch.testing.assert_close(ours[index], expected)
    features = (modality == Modality.IMAGE).nonzero().squeeze(-1)
    assert not torch.isclose(ours[features], sub_row.expand(len(features), -1)).all(-1).any()


@pytest.mark.parametrize("grid", [(1, 1), (2, 3)])
def test_overview_tags_are_the_slots_the_global_view_feeds(tiny_loaded, grid):
    """Change only the global view's pixels: exactly the slots tagged `overview` change."""
    from hae_cli.model.phi3v.image import image_token_overview

    h, w = grid
    vision = tiny_loaded.model.vision
    torch.manual_seed(2)
    pixels = torch.randn(1 + h * w, 3, 336, 336)
    other = pixels.clone()
    other[0] = torch.randn(3, 336, 336)  # index 0 is the global view
    with torch.no_grad():
        changed = ~torch.isclose(vision(pixels, h, w), vision(other, h, w)).all(dim=-1)
    overview = image_token_overview(h, w, 12)
    assert torch.equal(changed, overview) and int(overview.sum()) == 144


def _prompt(tiny_checkpoint, tiny_loaded, sizes, question="what color is the shape?"):
    from PIL import Image

    from hae_cli.model.phi3v.checkpoint import load_tokenizer
    from hae_cli.model.phi3v.image import ImageProcessorConfig, preprocess
    from hae_cli.model.phi3v.prompt import build_prompt, user_message

    tokenizer = load_tokenizer(tiny_checkpoint)
    config = ImageProcessorConfig.from_files(tiny_checkpoint, crop_size=336, patch_size=14)
    images = [preprocess(Image.new("RGB", size, (200, 30 * k, 10)), config) for k, size in enumerate(sizes)]
    prompt = build_prompt(tokenizer, user_message(question, len(images)), images)
    return tokenizer, images, prompt


def test_multi_image_features_land_at_their_slots(tiny_checkpoint, tiny_loaded):
    _, images, prompt = _prompt(tiny_checkpoint, tiny_loaded, [(64, 64), (100, 40), (40, 90)])
    model = tiny_loaded.model
    with torch.no_grad():
        embeds = model.embed(prompt, images)[0]
        for k, image in enumerate(images, start=1):
            slots = (prompt.input_ids == -k).nonzero().squeeze(-1)
            assert (prompt.image_id[slots] == k).all()
            torch.testing.assert_close(embeds[slots], model.vision(image.pixel_values, image.h_crops, image.w_crops))
        text = (prompt.input_ids >= 0).nonzero().squeeze(-1)
        torch.testing.assert_close(embeds[text], model.language_model.model.embed_tokens(prompt.input_ids[text]))


def test_greedy_generation_equals_the_argmax_chain_of_one_full_forward(tiny_checkpoint, tiny_loaded):
    tokenizer, images, prompt = _prompt(tiny_checkpoint, tiny_loaded, [(64, 64)])
    model = tiny_loaded.model
    with torch.no_grad():
        embeds = model.embed(prompt, images)
    result = generate(Phi35Vision.of_network(model, tokenizer), prompt, embeds, DynamicCache(),
                      SamplingConfig(max_new_tokens=12), stop_ids=set())
    assert len(result.token_ids) == 12
    lm = model.language_model
    with torch.no_grad():
        generated = lm.model.embed_tokens(torch.tensor([result.token_ids[:-1]]))
        full = torch.cat([embeds, generated], dim=1)
        logits = lm(inputs_embeds=full, position_ids=torch.arange(full.shape[1])[None]).logits[0]
    chain = logits[embeds.shape[1] - 1 :].argmax(-1).tolist()
    assert chain == result.token_ids


def test_explicit_positions_are_used(tiny_loaded):
    from hae_cli.model.decoder import run_decoder

    lm = tiny_loaded.model.language_model
    torch.manual_seed(3)
    embeds = torch.randn(1, 9, lm.config.hidden_size)
    # Gapped positions (as after eviction) past original_max_position_embeddings: long factors apply.
    shifted = torch.tensor([0, 1, 2, 3, 4700, 4701, 4702, 4900, 5000])
    with torch.no_grad():
        ours = run_decoder(lm, embeds, shifted, DynamicCache(), logits_rows=None).logits
        native = lm(inputs_embeds=embeds, position_ids=shifted[None]).logits
        unshifted = run_decoder(lm, embeds, torch.arange(9), DynamicCache(), logits_rows=None).logits
    torch.testing.assert_close(ours, native)
    assert (ours - unshifted).abs().max() > 1e-5  # float noise here is ~1e-7


def test_sampling_is_seeded_and_validated(tiny_checkpoint, tiny_loaded):
    tokenizer, images, prompt = _prompt(tiny_checkpoint, tiny_loaded, [(64, 64)])
    model = tiny_loaded.model
    with torch.no_grad():
        embeds = model.embed(prompt, images)

    def sampled(seed):
        config = SamplingConfig(max_new_tokens=8, temperature=1.5, top_p=0.9, seed=seed)
        return generate(Phi35Vision.of_network(model, tokenizer), prompt, embeds, DynamicCache(), config,
                        stop_ids=set()).token_ids

    assert sampled(1) == sampled(1)
    assert any(sampled(1) != sampled(s) for s in (2, 3, 4))
    for bad in (dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0)):
        with pytest.raises(ConfigError):
            SamplingConfig(**bad)


def test_tokenizer_loads_without_remote_code_prompt(tiny_checkpoint, tmp_path):
    from hae_cli.model.phi3v.checkpoint import load_tokenizer

    tokenizer = load_tokenizer(tiny_checkpoint)  # config.json has an auto_map: must not prompt
    assert tokenizer.chat_template
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    assert tokenizer("<|end|>", add_special_tokens=False).input_ids == [end]
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("cache_kind", ["dynamic", "evicting"])
def test_a_multi_token_chunk_on_a_held_cache_is_causal(tiny_loaded, cache_kind):
    """Chunked prefill must equal one forward: SDPA alone would align the chunk to key 0."""
    from hae_cli.cache import EvictingCache
    from hae_cli.model.decoder import run_decoder

    lm = tiny_loaded.model.language_model
    torch.manual_seed(4)
    embeds = torch.randn(1, 15, lm.config.hidden_size)
    cache = DynamicCache() if cache_kind == "dynamic" else EvictingCache("full", lm.config.num_hidden_layers)
    with torch.no_grad():
        whole = run_decoder(lm, embeds, torch.arange(15), DynamicCache(), logits_rows=None).logits
        run_decoder(lm, embeds[:, :10], torch.arange(10), cache, logits_rows=None)
        chunk = run_decoder(lm, embeds[:, 10:], torch.arange(10, 15), cache, logits_rows=None).logits
    torch.testing.assert_close(chunk, whole[:, 10:])
