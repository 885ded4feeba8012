"""Every native family behind the model interface, held to transformers' own model on its tiny
checkpoint (float32): the same prompt ids as the family's processor, the same logits as the
family's forward at the prefill and at every decode step, the same greedy tokens as its
`generate`; each turn of a chat equal to one forward over the transcript; and under eviction
(HAE's prefill pruning, rounds and bin restores) the logits of keeping every token and masking
the evicted ones, with budgets and per-image counts right at every step."""

from __future__ import annotations

import copy
import importlib

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import DynamicCache

from hae_cli import api
from hae_cli.cache import EvictingCache
from hae_cli.cache.rounds import held_bound
from hae_cli.conversation import Conversation
from hae_cli.model.generate import SamplingConfig, decode_one_token, generate, prefill

torch.set_num_threads(1)
ATOL = 1e-4
WRITERS = {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_vl", "llava": "llava", "llava_next": "llava",
           "llava_onevision": "llava", "idefics3": "idefics3", "smolvlm": "idefics3", "internvl": "internvl",
           "mistral3": "mistral3", "gemma3": "gemma3", "qwen3_vl": "qwen3_vl",
           "qwen3_vl_moe": "qwen3_vl"}
SIZES = [(200, 120), (90, 40), (40, 90)]  # (width, height): each image its own grid where a family has one


@pytest.fixture(scope="session", params=list(WRITERS))
def loaded(request, tmp_path_factory):
    model_type = request.param
    writer = importlib.import_module(f"hae_testing.checkpoints.{WRITERS[model_type]}")
    folder = writer.write_tiny_checkpoint(tmp_path_factory.mktemp(model_type) / "tiny", model_type, seed=0)
    return api.load_model(str(folder))


def pictures(count: int, seed: int = 1) -> list[Image.Image]:
    """A coloured rectangle on another colour, the colours drawn from `seed`."""
    rng = np.random.default_rng(seed)
    out = []
    for width, height in SIZES[:count]:
        pixels = np.empty((height, width, 3), dtype=np.uint8)
        pixels[:] = rng.integers(0, 256, 3)
        pixels[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = rng.integers(0, 256, 3)
        out.append(Image.fromarray(pixels))
    return out


def task(count: int) -> str:
    return "story" if count > 1 else "ask"


def reference_inputs(loaded, count: int, question: str, images: list) -> dict:
    """The family's processor on the family's chat template, as a user of transformers calls it."""
    turn = api.user_turn(task(count), question, count)
    rendered = loaded.processor.apply_chat_template([loaded._user(turn)], add_generation_prompt=True)
    return dict(loaded.processor(text=[rendered], images=[images], add_special_tokens=loaded._adds_bos(rendered),
                                 return_tensors="pt"))


def step_by_step(loaded, prepared, tokens, cache, after_step=None):
    """Our logits at the prefill and after feeding each of `tokens` but the last."""
    with torch.inference_mode():
        position_ids, position = loaded.position_ids(prepared.tokens, 0)
        logits = [prefill(loaded, prepared.embeds, prepared.tokens, position_ids, cache)]
        if after_step is not None:
            after_step(0, cache)
        for k, token in enumerate(tokens[:-1]):
            logits.append(decode_one_token(loaded, token, position + k, cache))
            if after_step is not None:
                after_step(k + 1, cache)
    return torch.stack(logits)


@pytest.mark.parametrize("count", [1, 2, 3])
def test_prompt_logits_and_greedy_tokens_equal_the_familys_own(loaded, count):
    images, question = pictures(count), "what is shown?"
    inputs = reference_inputs(loaded, count, question, images)
    prepared = api.prepare(loaded, images, question, task=task(count))
    assert prepared.tokens.input_ids.tolist() == inputs["input_ids"][0].tolist()
    config = copy.deepcopy(loaded.model.generation_config)
    config.eos_token_id = []  # 32 tokens whatever comes: no stop, and no EOS suppressed either
    with torch.inference_mode():
        reference = loaded.model.generate(**inputs, generation_config=config, max_new_tokens=32, do_sample=False,
                                          output_logits=True, return_dict_in_generate=True)
    expected = reference.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    ran = generate(loaded, prepared.tokens, prepared.embeds, EvictingCache("full", loaded.num_layers),
                   SamplingConfig(max_new_tokens=32), stop_ids=set())
    assert ran.token_ids == expected
    assert len(set(expected)) > 1, "a tiny model that repeats one token would prove little"
    ours = step_by_step(loaded, prepared, expected, EvictingCache("full", loaded.num_layers))
    torch.testing.assert_close(ours, torch.cat(reference.logits), atol=ATOL, rtol=0)


def test_each_chat_turn_equals_one_forward_over_the_transcript(loaded):
    images = pictures(2)
    conversation = Conversation(loaded, images, policy="full", max_new_tokens=6)
    for question in ("what is in image 1?", "and in image 2?", "which is larger?"):
        conversation.ask(question)
    ids = torch.tensor([conversation.fed_ids])
    expanded, _ = loaded._expand([loaded.read_image(image) for image in images])
    token_types = {"mm_token_type_ids", "token_type_ids"} & set(expanded)  # Qwen2-VL's, Gemma 3's
    pixels = {k: v for k, v in expanded.items() if k not in {"input_ids", "attention_mask", *token_types}}
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **pixels}
    for name in token_types:  # which ids are image tokens
        inputs[name] = (ids == loaded.image_token_id).long()
    with torch.inference_mode():
        logits = loaded.model(**inputs).logits[0]
    for turn in conversation.turns:
        row = turn.start_position + turn.fed_tokens - 1  # the row the answer's first token comes from
        torch.testing.assert_close(turn.first_logits, logits[row], atol=ATOL, rtol=0)
        answer_rows = range(row, row + len(turn.result.token_ids))
        assert [int(logits[r].argmax()) for r in answer_rows] == turn.result.token_ids


def test_hae_eviction_equals_masking_through_pruning_rounds_and_restores(loaded):
    """HAE at a tight budget: prefill pruning (index broadcasting), rounds, bin restores. The
    reference keeps every token in a DynamicCache and, layer by layer, masks those the evicting
    cache did not hold when the step ran."""
    images, question, steps = pictures(2), "describe them", 24
    prepared = api.prepare(loaded, images, question, task="story")
    length = len(prepared.tokens)
    policy = api.policy_of("hae", {"budget": 0.4, "buffer": 2, "recent": 2, "sink": 2, "score_layer": 0})
    held: list[list[torch.Tensor]] = []  # after each step, per layer: the token indices held

    def record(step, cache):
        held.append([layer.token_index[0].clone() for layer in cache.layers])
        image_ids = prepared.tokens.image_id
        stats = cache.stats()
        for layer, layer_stats in zip(cache.layers, stats.layers):
            assert layer.budget is None or layer.held <= layer.budget + 2
            inside = layer.token_index[0][layer.token_index[0] < length]
            counts = [int((image_ids[inside] == k).sum()) for k in range(1, 3)]
            assert layer_stats.tokens_by_image == counts

    full_tokens = generate(loaded, prepared.tokens, prepared.embeds, EvictingCache("full", loaded.num_layers),
                           SamplingConfig(max_new_tokens=steps), stop_ids=set()).token_ids
    cache = EvictingCache(policy, loaded.num_layers)
    ours = step_by_step(loaded, prepared, full_tokens, cache, after_step=record)
    actions = {e.action for e in cache.events}
    assert {"evicted", "binned", "restored"} <= actions, actions

    # what the prompt's forward saw: the pruning alone (no budget, so no round when it ends)
    unbudgeted = EvictingCache(api.policy_of("hae", {"score_layer": 0}), loaded.num_layers)
    step_by_step(loaded, prepared, full_tokens[:1], unbudgeted)
    last = max(i for i, layer in enumerate(unbudgeted.layers) if layer.window is None)  # a window trims more
    pruned = set(range(length)) - set(unbudgeted.layers[last].token_index[0].tolist())
    assert pruned, "the prefill pruned nothing"

    prompt_masks = family_prefill_masks(loaded, prepared)

    def mask(step, layer, q, kv):
        if step == 0:  # the prompt's forward: rows pruned at the scoring layer are hidden after it
            hidden = sorted(pruned) if layer > policy.score_layer else []
            allowed = prompt_masks[layer].clone()
        else:
            hidden = sorted(set(range(kv - 1)) - set(held[step - 1][layer].tolist()))
            allowed = torch.ones(q, kv, dtype=torch.bool).tril(kv - q)
        if hidden:
            allowed[:, hidden] = False
        return allowed[None, None]

    reference = masked_logits(loaded, prepared, full_tokens, mask)
    torch.testing.assert_close(ours, reference, atol=ATOL, rtol=0)


def family_prefill_masks(loaded, prepared) -> list[torch.Tensor]:
    """Per layer, the prompt's mask `[q, q]` (True = attend) as the family's own code makes it:
    causal, or Gemma 3's (a sliding window on sliding layers, an image's soft tokens both ways)."""
    q = len(prepared.tokens)
    causal = torch.ones(q, q, dtype=torch.bool).tril()
    config = loaded.text_config
    if getattr(config, "sliding_window", None) is None or not hasattr(config, "layer_types"):
        return [causal] * loaded.num_layers
    from transformers.models.gemma3.modeling_gemma3 import (
        create_masks_for_vision_model,
        get_block_sequence_ids_for_mask,
    )

    token_types = (prepared.tokens.input_ids == loaded.image_token_id).long()[None]
    masks = create_masks_for_vision_model(config, prepared.embeds, None, None, torch.arange(q)[None],
                                          get_block_sequence_ids_for_mask(token_types))
    return [masks[kind][0, 0] for kind in config.layer_types]


def masked_logits(loaded, prepared, tokens, mask_fn) -> torch.Tensor:
    """Every token kept in a DynamicCache, the mask from `mask_fn(step, layer, q, kv)` per layer."""
    backbone, cache = loaded.backbone, DynamicCache()
    logits = []

    additions = loaded.layer_additions(prepared.tokens) or {}  # Qwen3-VL's deepstack, at the prompt

    def forward(embeds, position_ids, step):
        hidden = embeds
        embeddings = backbone.position_embeddings(hidden, position_ids)
        q = hidden.shape[1]
        for layer_idx, layer in enumerate(backbone.layers):
            hidden = layer(hidden, attention_mask=mask_fn(step, layer_idx, q, cache.get_seq_length(layer_idx) + q),
                           position_ids=backbone.layer_position_ids(position_ids), cache=cache, use_cache=True,
                           position_embeddings=embeddings[layer_idx])
            if step == 0 and layer_idx in additions:
                hidden = hidden + additions[layer_idx]
        return backbone.lm_head(backbone.norm(hidden))[0, -1]

    with torch.inference_mode():
        position_ids, position = loaded.position_ids(prepared.tokens, 0)
        logits.append(forward(prepared.embeds, position_ids, 0))
        for k, token in enumerate(tokens[:-1]):
            logits.append(forward(loaded.embed_ids(torch.tensor([token])), loaded.decode_position_ids(position + k),
                                  k + 1))
    return torch.stack(logits)


def test_the_compiled_steps_fixed_shape_walk_gives_the_eager_logits(loaded):
    """The decode step `--compile` captures, run without the compiler: each layer's own rotary
    embedding, a sliding layer held to its window, through HAE's rounds and restores."""
    from hae_cli.model.compiled import CompiledStep

    prepared, steps = api.prepare(loaded, pictures(2), "describe them", task="story"), 24
    params = {"budget": 0.4, "buffer": 2, "recent": 2, "sink": 2, "score_layer": 0}

    def run(fixed: bool) -> tuple[torch.Tensor, EvictingCache]:
        cache = api.make_cache(loaded, "hae", params)
        with torch.inference_mode():
            position_ids, position = loaded.position_ids(prepared.tokens, 0)
            logits = prefill(loaded, prepared.embeds, prepared.tokens, position_ids, cache)
            step = CompiledStep(loaded, cache, compile=False) if fixed else None
            if step is not None:
                step.make_room(steps + 1)
            seen = []
            for k in range(steps):
                token = int(logits.argmax())
                logits = step(token, position + k) if step else decode_one_token(loaded, token, position + k, cache)
                seen.append(logits.float())
        return torch.stack(seen), cache

    (eager, eager_cache), (fixed, fixed_cache) = run(False), run(True)
    torch.testing.assert_close(fixed, eager, atol=ATOL, rtol=0)
    assert [layer.held for layer in fixed_cache.layers] == [layer.held for layer in eager_cache.layers]
    assert any(e.action == "binned" for e in fixed_cache.events)


POLICY_PARAMS = {"full": {}, "hae": {"budget": 0.5, "buffer": 2, "score_layer": 0},
                 "streaming": {"budget": 24, "buffer": 2}, "h2o": {"budget": 24, "buffer": 2},
                 "snapkv": {"budget": 24}, "fastv": {"prune_layer": 1}, "mustdrop": {"score_layer": 0, "budget": 24}}


@pytest.mark.parametrize("policy", list(POLICY_PARAMS))
def test_every_policy_on_a_family_with_its_own_layer_rules(loaded, policy):
    """Families whose layers differ (Gemma 3's windows) or take additions (Qwen3-VL's deepstack):
    every policy decodes, keeps its budget, and a sliding layer never holds more than its window."""
    from hae_cli.model.interface import VisionLanguageModel

    if loaded.backbone.rules is None and type(loaded).layer_additions is VisionLanguageModel.layer_additions:
        pytest.skip("every layer follows the same rules")
    prepared = api.prepare(loaded, pictures(2), "describe them", task="story")
    cache = api.make_cache(loaded, policy, POLICY_PARAMS[policy])
    result = generate(loaded, prepared.tokens, prepared.embeds, cache, SamplingConfig(max_new_tokens=12), stop_ids=set())
    assert len(result.token_ids) == 12
    for layer in cache.layers:
        assert layer.budget is None or layer.held <= held_bound(layer.budget, cache.policy.buffer)
        assert layer.window is None or layer.held < layer.window


# The processor options that give an image's overview alone, where a family's processor has them.
OVERVIEW_ALONE = {"internvl": {"crop_to_patches": False}}
# How a family cuts each of `pictures(3)` (wide, wide, tall): InternVL's tiles, Mistral 3's rows
# and columns of merged patches (the longest edge fit to 112 pixels, 28 a token), [rows, cols].
LAYOUTS = {"internvl": ("tiles", [[2, 3], [1, 2], [2, 1]]), "mistral3": ("grid", [[3, 4], [2, 4], [4, 2]])}


def test_the_overview_slots_hold_the_features_of_the_whole_image(loaded):
    """What HAE's floor draws on: the slots tagged overview are exactly those whose embeddings are
    the model's own features of the image seen whole (InternVL's thumbnail)."""
    options = OVERVIEW_ALONE.get(loaded.config.model_type)
    if options is None:
        pytest.skip("the family's processor cannot give the overview alone")
    images = pictures(3)
    prepared = api.prepare(loaded, images, "what is shown?", task="story")
    overview = prepared.tokens.overview
    with torch.inference_mode():
        whole = loaded.processor.image_processor(images, return_tensors="pt", **options)["pixel_values"]
        features = loaded.model.model.get_image_features(whole).pooler_output
    per_image = [int((overview & (prepared.tokens.image_id == k + 1)).sum()) for k in range(3)]
    assert per_image == [features.shape[1]] * 3
    torch.testing.assert_close(prepared.embeds[0, overview], features.reshape(-1, features.shape[-1]), atol=1e-5,
                               rtol=0)


def test_each_images_views_hold_its_slots_as_tagged(loaded):
    """What --show-kept draws agrees with the tags: each image is cut as the family's processor cuts
    it, and the slots its views draw as separators (a row's end, a marker view) are exactly those
    tagged separator."""
    from hae_cli.cache.modality import Modality

    images = pictures(3)
    prepared = api.prepare(loaded, images, "what is shown?", task="story")
    if loaded.config.model_type in LAYOUTS:
        key, expected = LAYOUTS[loaded.config.model_type]
        assert [layout[key] for layout in prepared.image_layouts] == expected
    for k, (picture, layout) in enumerate(zip(images, prepared.image_layouts)):
        cells = loaded.image_cells(picture, layout)
        drawn = [bool(cells.views[v].separator or c == cells.views[v].cols) for v, c in zip(cells.view, cells.col)]
        tagged = (prepared.tokens.modality[prepared.tokens.image_id == k + 1] == Modality.SEPARATOR).tolist()
        assert drawn == tagged


# ----------------------------------------------------------------------------- the commands, end to end


@pytest.fixture(scope="session")
def files(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("family_images")
    paths = []
    for k, image in enumerate(pictures(3, seed=5)):
        paths.append(str(folder / f"image_{k}.png"))
        image.save(paths[-1])
    return paths


def cli(*args):
    import json

    from typer.testing import CliRunner

    from hae_cli import cli as commands

    result = CliRunner().invoke(commands.app, [str(a) for a in args])
    assert result.exit_code == 0, result.output[-3000:]
    return json.loads(result.stdout) if "--json" in args else result


def test_ask_story_chat_and_profile_on_every_family(loaded, files, tmp_path):
    model = str(loaded.folder)
    png = tmp_path / "kept.png"
    asked = cli("ask", files[0], "what is shown?", "--model", model, "-n", "6", "--json", "--show-kept", png)
    assert asked["policy"] == "hae" and asked["kept"]["images"][0]["slots"] == asked["final_cache"]["image_sizes"][0]
    drawn = Image.open(png)
    assert drawn.width > 100 and drawn.height > 100
    story = cli("story", *files, "--model", model, "-n", "8", "--budget", "0.5", "-p", "buffer=2", "--json")
    layers = story["final_cache"]["layers"]
    assert len(layers[0]["tokens_by_image"]) == 3 and all(layer["tokens_held"] <= layer["budget"] + 2 for layer in layers)
    assert all(layer["window"] is None or layer["tokens_held"] < layer["window"] for layer in layers)  # Gemma 3's
    script = tmp_path / "questions.txt"
    script.write_text("what is in image 1?\n/images " + files[2] + "\nand image 3?\n")
    chat = cli("chat", *files[:2], "--model", model, "-n", "4", "--script", script, "--json")
    assert [turn["turn"] for turn in chat["turns"]] == [1, 2] and chat["turns"][1]["images_added"] == [files[2]]
    report = cli("profile", "--images", files[0], "--question", "what is shown?", "--compare", "baseline,hae,h2o",
                 "--model", model, "-n", "4", "--json", "-")
    assert [row["name"] for row in report["summary"]] == ["baseline", "hae", "h2o"]


# Each family's image option: a value that changes how a picture of (width, height) is cut, the
# same setting given to the family's processor at call time (as a user of transformers gives it),
# and the [rows, cols] of tiles or crops the layout then says, where it has them.
IMAGE_OPTIONS = {
    "max_pixels": (6 * 32 * 32, lambda value, size: {"size": {"shortest_edge": size.shortest_edge, "longest_edge": value}},
                   (200, 120), None),
    "max_tiles": (1, lambda value, size: {"max_patches": value}, (200, 120), [0, 0]),
    "longest_edge": (56, lambda value, size: {"size": {"longest_edge": value}}, (200, 120), None),
    "pan_and_scan_crops": (2, lambda value, size: {"do_pan_and_scan": True, "pan_and_scan_max_num_crops": value},
                           (900, 300), [1, 2]),
}


def test_an_image_option_is_the_familys_own_processor_setting(loaded):
    """The ids are the processor's with that setting, the layout follows, and greedy tokens equal
    the family's own generate on the processor's inputs (Gemma 3's crops: an image block each)."""
    from hae_cli.model.hf_processor import load_processor

    if not loaded.image_options:
        pytest.skip("the family has no image option")
    (option,) = loaded.image_options
    value, processor_kwargs, size, tiles = IMAGE_OPTIONS[option]
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    pixels[:, : size[0] // 3] = (200, 30, 30)
    pixels[size[1] // 2 :, size[0] // 2 :] = (30, 30, 220)
    images = [Image.fromarray(pixels)]
    option_loaded = api.load_model(str(loaded.folder), image_options={option: value})
    prepared = api.prepare(option_loaded, images, "what is shown?", task="ask")
    processor = load_processor(loaded.folder)
    rendered = processor.apply_chat_template([loaded._user(api.user_turn("ask", "what is shown?", 1))],
                                             add_generation_prompt=True)
    inputs = dict(processor(text=[rendered], images=[images], add_special_tokens=loaded._adds_bos(rendered),
                            return_tensors="pt", **processor_kwargs(value, processor.image_processor.size)))
    assert prepared.tokens.input_ids.tolist() == inputs["input_ids"][0].tolist()
    assert len(prepared.tokens) != len(api.prepare(loaded, images, "what is shown?", task="ask").tokens)
    if tiles is not None:
        assert prepared.image_layouts[0]["tiles"] == tiles
    if tiles is not None and tiles != [0, 0]:  # the crops' overview: the whole image, as without the option
        whole = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            features = option_loaded.model.model.get_image_features(whole).pooler_output
        torch.testing.assert_close(prepared.embeds[0, prepared.tokens.overview],
                                   features.reshape(-1, features.shape[-1]), atol=1e-5, rtol=0)
    with torch.inference_mode():
        expected = option_loaded.model.generate(**inputs, max_new_tokens=8, do_sample=False, min_new_tokens=8,
                                                output_logits=True, return_dict_in_generate=True)
    ran = generate(option_loaded, prepared.tokens, prepared.embeds, EvictingCache("full", loaded.num_layers),
                   SamplingConfig(max_new_tokens=8), stop_ids=set())
    assert ran.token_ids == expected.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    torch.testing.assert_close(ran.first_logits, expected.logits[0][0], atol=ATOL, rtol=0)


def test_an_image_option_a_family_lacks_is_one_line(loaded, files):
    from typer.testing import CliRunner

    from hae_cli import cli as commands

    result = CliRunner().invoke(commands.app, ["ask", files[0], "what?", "--model", str(loaded.folder), "--num-crops", "2"])
    lines = result.stderr.strip().splitlines()
    takes = ", ".join(loaded.image_options) or "none"
    assert result.exit_code == 2 and lines == [
        f"error: image option num_crops: {loaded.family} has no such option (its image options: {takes})"]


def test_an_unsupported_model_type_is_one_line_naming_the_supported_ones(tmp_path, files):
    from typer.testing import CliRunner

    from hae_cli import cli as commands

    (tmp_path / "config.json").write_text('{"model_type": "paligemma"}')
    result = CliRunner().invoke(commands.app, ["ask", files[0], "what?", "--model", str(tmp_path)])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "'paligemma' is not supported" in lines[0]
    for model_type in ("phi3_v", *WRITERS):
        assert model_type in lines[0]
    listing = CliRunner().invoke(commands.app, ["families"], env={"COLUMNS": "200"})
    assert listing.exit_code == 0 and "Qwen2-VL" in listing.stdout and "the base view" in listing.stdout
