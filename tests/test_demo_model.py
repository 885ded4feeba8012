"""The shipped demo model, loaded through the official-layout path, still answers easy-VQA.

Guards both the checkpoint and the runtime (image preprocessing, prompt layout, embedding,
decoder, generate) against regressions: any drift in how an image or a prompt is laid out
drops the accuracy of a model trained on the old layout.
"""

import json
import random
from pathlib import Path

import pytest

from hae_cli.api import load_model
from hae_testing.data import easyvqa
from hae_testing.data.conversation_sets import conversation_sets
from hae_testing.data.evaluate import conversation_accuracy, full_cache_answers, story_exact_match, vqa_accuracy
from hae_cli.model.loading import resolve_model_path

SAMPLE_IMAGES = Path(__file__).resolve().parent.parent / "sample_images"
MAX_CHECKPOINT_BYTES = 25 * 1024 * 1024
# What the shipped model scores on the 300 questions below, and the floor under which the
# model or the runtime has regressed. Raise both when a better model ships.
VQA_300 = 298 / 300  # measured when the model was shipped (99.89% on the whole test split)
REGRESSION_FLOOR = 0.90  # issue 5's bar for this subset
STORIES_30 = 29 / 30  # four-image sets (seed 1), measured when shipped (191/200 on seed 0)
# Questions in 20 seeded four-image conversations (seed 1), full cache: 94 of 99 when shipped.
CONVERSATIONS_20 = 94 / 99
CONVERSATION_FLOOR = 0.85
STORY_FLOOR = 0.90  # issue 5's bar for captions


@pytest.fixture(scope="module")
def loaded():
    return load_model("demo")  # resolve_model_path("demo") + load_checkpoint


def test_demo_checkpoint_is_small_and_official():
    folder = resolve_model_path("demo")
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "preprocessor_config.json", "tokenizer.json"} <= names
    assert sum(p.stat().st_size for p in folder.iterdir()) <= MAX_CHECKPOINT_BYTES
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "phi3_v" and config["architectures"] == ["Phi3VForCausalLM"]


def test_demo_images_take_at_least_300_slots(loaded):
    image = loaded.read_image(easyvqa.image_path(easyvqa.load_split("test")[0].image_id, "test"))
    assert image.num_tokens >= 300


@pytest.fixture(scope="module")
def vqa_300(loaded) -> dict:
    return vqa_accuracy(loaded, random.Random(0).sample(easyvqa.load_split("test"), 300))


def test_vqa_accuracy_on_300_seeded_test_questions_meets_the_bar(vqa_300):
    # A runtime that lays images or prompts out differently from training falls to about
    # chance (~35%: half the questions are yes/no).
    assert vqa_300["accuracy"] >= REGRESSION_FLOOR, f"{vqa_300['correct']}/300; misses: {vqa_300['wrong'][:5]}"


def test_story_captions_on_30_seeded_four_image_sets_meet_the_bar(loaded):
    # Sets other than the 200 (seed 0) the model was measured on when it shipped.
    result = story_exact_match(loaded, easyvqa.story_sets("test", 30, 4, seed=1))
    assert result["accuracy"] >= STORY_FLOOR, f"{result['correct']}/30; misses: {result['wrong'][:3]}"


def test_questions_in_four_image_conversations_meet_the_bar(loaded):
    # Questions addressed to one image of four ("is there a circle in image 3?"), or asking
    # which image shows something, each asked after the images into one cache.
    result = conversation_accuracy(loaded, conversation_sets("test", 20, 4, seed=1))
    assert result["accuracy"] >= CONVERSATION_FLOOR, f"{result['correct']}/{result['total']}; misses: {result['wrong'][:3]}"


def test_sample_images_are_answered_correctly(loaded):
    from hae_cli.evaluation.records import read_data

    data = read_data(SAMPLE_IMAGES, strict=True)  # questions.json, as hae eval reads it
    assert data.items
    for item, answered in zip(data.items, full_cache_answers(loaded, data.items, "ask", max_new_tokens=2)):
        assert answered["answers"] == list(item.questions[0].answers), item


@pytest.mark.parametrize("policy", ["full", None])
def test_story_command_captions_the_sample_images_in_order(policy):
    """The README's `hae story` demo through the CLI, full cache and with no flags (the default
    HAE): each sample image's caption, built from its colour and shape in questions.json, in
    the order given; the JSON says what each layer holds of each image, as the cache's tags
    count it (sums with text and generated to the layer's size)."""
    from typer.testing import CliRunner

    from hae_cli import cli

    known: dict[str, dict[str, str]] = {}
    for entry in json.loads((SAMPLE_IMAGES / "questions.json").read_text()):
        kind = "color" if "color" in entry["question"] else "shape"
        known.setdefault(entry["image"], {})[kind] = entry["answer"]
    names = [name for name, facts in sorted(known.items()) if len(facts) == 2][:4]
    assert len(names) == 4
    flags = ["--policy", policy] if policy else []
    result = CliRunner().invoke(cli.app, ["story", *[str(SAMPLE_IMAGES / n) for n in reversed(names)], *flags, "--json"])
    assert result.exit_code == 0, result.output
    expected = " ".join(f"image {k}: a {known[n]['color']} {known[n]['shape']}." for k, n in enumerate(reversed(names), 1))
    document = json.loads(result.stdout)
    assert document["text"] == expected
    final = document["final_cache"]
    assert final["image_sizes"] == [313] * 4
    for layer in final["layers"]:
        by = layer["tokens_by_modality"]
        assert len(layer["tokens_by_image"]) == 4
        assert sum(layer["tokens_by_image"]) == by["image"] + by["separator"]
        assert layer["tokens_held"] == sum(layer["tokens_by_image"]) + by["text"] + by["generated"]
        if policy is None:  # the default HAE keeps part of every image, none starved
            assert all(40 <= held < 313 for held in layer["tokens_by_image"])
