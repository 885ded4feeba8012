"""The demo-model trainer's sequences and guides: a wrong label, mask row, guide target or
probe fact here trains the model on the wrong thing without any error, so each is pinned on
small cases and on the data itself."""

from __future__ import annotations

import importlib.util
import random
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from hae_cli.cache.modality import Modality
from hae_testing.data import easyvqa
from hae_cli.model.phi3v.image import ImageProcessorConfig
from hae_testing.checkpoints.phi3v import build_model
from hae_testing.checkpoints.phi3v_tokenizer import build_tiny_tokenizer

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_demo_model.py"


@pytest.fixture(scope="module")
def trainer():
    spec = importlib.util.spec_from_file_location("train_demo_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def examples(trainer):
    tokenizer = build_tiny_tokenizer(easyvqa.vocabulary())
    return trainer.Examples(tokenizer, ImageProcessorConfig(num_crops=trainer.NUM_CROPS), balance_seed=0)


def test_tree_labels_positions_mask_and_answer_rows(trainer):
    ids, positions, mask, labels, answer_rows = trainer._tree([10, 11], [([20, 21], [30, 31]), ([40], [50])])
    assert ids.tolist() == [10, 11, 20, 21, 30, 31, 40, 50]
    # Each branch's positions continue the prefix's as if it were alone.
    assert positions.tolist() == [0, 1, 2, 3, 4, 5, 2, 3]
    # Row t predicts token t+1 within its branch: the last prompt row predicts the first target.
    assert labels.tolist() == [-100, -100, -100, 30, 31, -100, 50, -100]
    assert answer_rows == [3, 6]
    # The second branch sees the prefix and itself, never the first branch.
    assert mask[6].tolist() == [True, True, False, False, False, False, True, False]
    assert mask[5].tolist() == [True] * 6 + [False, False]


def test_collate_pads_without_loss_attention_or_guides(trainer, examples):
    short, long = sorted((examples.vqa_tree(i) for i in examples.image_ids[:2]), key=lambda s: s.input_ids.numel())
    batch = trainer.collate([long, short])
    n = short.input_ids.numel()
    length = long.input_ids.numel()
    assert batch.input_ids.shape == batch.labels.shape == (2, length)
    assert batch.labels[1, n:].eq(-100).all() and batch.answer_image[1, n:].eq(0).all()
    assert batch.latest_number[1, n:].eq(-1).all() and batch.facts[1, n:].eq(-100).all()
    assert batch.mask.shape == (2, 1, length, length)
    assert batch.mask[1, 0, -1].nonzero().squeeze(-1).tolist() == [length - 1]  # padding sees itself only
    assert torch.equal(batch.mask[0, 0], long.mask) and torch.equal(batch.facts[1, :n], short.facts)
    assert batch.image_ids == [long.image_ids, short.image_ids]


def test_question_parts_agree_with_every_images_attributes():
    """A negation misread ("is no red shape present?") would flip some of these."""
    for split in easyvqa.SPLITS:
        attributes = easyvqa.image_attributes(split)
        checked = 0
        for q in easyvqa.load_split(split):
            there = easyvqa.names_what_is_there(q)
            if there is None or q.image_id not in attributes:
                continue
            named = easyvqa.question_parts(q.question).named
            assert len(named) == 1, q
            assert there == (named[0] in attributes[q.image_id]), q
            checked += 1
        assert checked > 0.6 * len(easyvqa.load_split(split))


def test_balancing_makes_each_yes_no_kind_half_there(trainer):
    questions = list(easyvqa.load_split("train"))
    attributes = easyvqa.image_attributes("train")
    extra = trainer.balancing_questions(questions, attributes, random.Random(0))
    wordings = {q.question for q in questions}
    counts = Counter()
    for q in questions + extra:
        there = easyvqa.names_what_is_there(q)
        if there is not None:
            kind = "color" if easyvqa.question_parts(q.question).color else "shape"
            counts[kind, there] += 1
    assert counts["color", True] == counts["color", False] and counts["shape", True] == counts["shape", False]
    assert len(extra) > 15_000
    for q in extra:
        # Each names its image's own colour or shape, in a wording easy-VQA itself uses.
        assert easyvqa.names_what_is_there(q) and easyvqa.question_parts(q.question).named[0] in attributes[q.image_id]
        assert any(w.replace(easyvqa.question_parts(w).named[0], "") == q.question.replace(
            easyvqa.question_parts(q.question).named[0], "") for w in wordings if easyvqa.question_parts(w).named)
    per_image = Counter(q.image_id for q in extra)
    assert max(per_image.values()) - min(per_image.values()) <= 2


def test_vqa_tree_facts_are_each_questions(trainer, examples):
    image_id = examples.captioned_ids[3]
    tree = examples.vqa_tree(image_id)
    rows = tree.answer_image.nonzero().squeeze(-1)
    questions = examples.by_image[image_id]
    assert rows.numel() == len(questions) and tree.latest_number.eq(-1).all()
    colour, shape = examples.attributes[image_id]
    for row, q in zip(rows.tolist(), questions):
        assert examples.tokenizer.decode([int(tree.labels[row])]) == q.answer  # the answer row
        facts = dict(zip(trainer.FACTS, tree.facts[row].tolist()))
        parts = easyvqa.question_parts(q.question)
        assert facts["color"] == easyvqa.COLORS.index(colour) and facts["shape"] == easyvqa.SHAPES.index(shape)
        assert facts["named_color"] == (easyvqa.COLORS.index(parts.color) if parts.color else len(easyvqa.COLORS))
        assert facts["named_shape"] == (easyvqa.SHAPES.index(parts.shape) if parts.shape else len(easyvqa.SHAPES))
        assert facts["negated"] == int(parts.negated)
        there = easyvqa.names_what_is_there(q)
        assert facts["there"] == (-100 if there is None else int(there))


def test_story_guides_point_at_each_images_label_and_caption(trainer, examples):
    image_ids = examples.captioned_ids[5:9]
    story = examples.story(image_ids)
    tokens = examples.tokenizer.convert_ids_to_tokens([max(i, 0) for i in story.input_ids.tolist()])
    for k in range(1, len(image_ids) + 1):
        slots = (story.input_ids == -k).nonzero().squeeze(-1)
        # Every slot of image k looks back to the number of its label "Image k:".
        numbers = story.latest_number[slots].unique()
        assert numbers.numel() == 1 and tokens[int(numbers)] == str(k) and tokens[int(numbers) - 1] == "image"
    rows = story.answer_image.nonzero().squeeze(-1)
    # Two answer rows per caption: the rows that write its colour and its shape.
    assert story.answer_image[rows].tolist() == [k for k in range(1, len(image_ids) + 1) for _ in range(2)]
    written = examples.tokenizer.convert_ids_to_tokens(story.labels[rows].tolist())
    for i, image_id in enumerate(image_ids):
        colour, shape = examples.attributes[image_id]
        assert written[2 * i : 2 * i + 2] == [colour, shape]
        assert story.facts[rows[2 * i], :2].tolist() == [easyvqa.COLORS.index(colour), easyvqa.SHAPES.index(shape)]
        # The caption's rows look back to the number the caption itself wrote, after the prompt.
        assert int(story.latest_number[rows[2 * i]]) > int((story.input_ids == -len(image_ids)).nonzero().max())
    assert story.facts[rows, 2:].eq(-100).all()


def test_conversation_sequences_are_the_transcript_a_conversation_feeds(trainer, examples):
    from hae_testing.data import conversation_sets
    from hae_cli.model.phi3v.prompt import chat_text, encode_prompt_text, story_message

    rng = random.Random(3)
    for size in (2, 5, 8):
        image_ids = rng.sample(examples.captioned_ids, size)
        turns = conversation_sets.conversation(image_ids, 5, "train", rng, examples.by_image, which_share=0.4)
        sequence = examples.conversation(image_ids, turns)
        ids = sequence.input_ids.tolist()
        messages = []
        for t, turn in enumerate(turns):
            messages += [{"role": "user", "content": story_message(turn.question, size) if t == 0 else turn.question},
                         {"role": "assistant", "content": turn.answer}]
        whole = encode_prompt_text(examples.tokenizer, chat_text(examples.tokenizer, messages), [examples.slots] * size)
        assert ids == whole.input_ids.tolist()[:-1]  # the template's closing "\n" is fed with a next question
        # loss on each answer word and the <|end|> after it, nowhere else
        rows = (sequence.labels != -100).nonzero().squeeze(-1)
        written = examples.tokenizer.convert_ids_to_tokens(sequence.labels[rows].tolist())
        assert written == [w for turn in turns for w in (turn.answer, "<|end|>")]
        assert all(int(sequence.labels[r]) == ids[r + 1] for r in rows.tolist())
        # the guides see each answer's first row as an answer about the image its question names
        answer_rows = rows[0::2]
        assert sequence.answer_image[answer_rows].tolist() == [turn.about for turn in turns]
        assert int(sequence.answer_image.count_nonzero()) == len(turns)
        for row, turn in zip(answer_rows.tolist(), turns):
            colour, shape = examples.attributes[image_ids[turn.about - 1]]
            assert sequence.facts[row, :2].tolist() == [easyvqa.COLORS.index(colour), easyvqa.SHAPES.index(shape)]
            if not turn.question.startswith("which"):
                # the row after "image k" in the question looks back to that k
                tokens = examples.tokenizer.convert_ids_to_tokens([max(ids[int(sequence.latest_number[row])], 0)])
                assert tokens == [str(turn.about)]


def test_addressed_questions_name_their_image_and_keep_the_easy_vqa_answer():
    from hae_testing.data import conversation_sets

    assert conversation_sets.addressed("does the image contain a circle?", 3) == "does image 3 contain a circle?"
    assert conversation_sets.addressed("what color is the shape?", 2) == "what color is the shape in image 2?"
    attributes = easyvqa.image_attributes("train")
    rng = random.Random(0)
    for _ in range(200):
        image_ids = rng.sample(sorted(attributes), rng.randint(2, 8))
        turn = conversation_sets.which_image(image_ids, "train", rng)
        if turn is None:
            continue
        parts = easyvqa.question_parts(turn.question)
        matches = [k for k, i in enumerate(image_ids, start=1)
                   if parts.color in (None, attributes[i][0]) and parts.shape in (None, attributes[i][1])]
        assert matches == [int(turn.answer)] == [turn.about]


def test_slot_coverage_follows_the_image_token_layout(trainer, examples):
    mask = torch.zeros(64, 64)
    mask[:32, :32] = 1  # the top-left quarter
    modalities = examples.slots.modalities
    shares = trainer.slot_coverage(mask, 336, 14, modalities)
    assert shares.shape == modalities.shape
    assert shares[modalities != Modality.IMAGE].eq(0).all()
    image_slots = shares[modalities == Modality.IMAGE]
    for view in image_slots.reshape(2, 12, 12):  # the crop, then the global view, row-major
        assert view[:6, :6].eq(1).all() and view[6:].eq(0).all() and view[:, 6:].eq(0).all()


@pytest.mark.parametrize("tree", [True, False], ids=["tree-mask", "plain-causal"])
def test_captured_attention_is_the_layers_attention(trainer, tree):
    """The guides score the rows they supervise from captured queries and keys; those must
    give the attention the layer really computed (scale, mask, rotation), for VQA trees (a
    mask) and stories (no mask: SDPA's causal kernel)."""
    tokenizer = build_tiny_tokenizer(easyvqa.vocabulary())
    model = build_model(tokenizer, text=trainer.TEXT, vision=trainer.VISION, seed=0)
    guides = trainer.Guides(model.config.text.hidden_size, 0.3)
    backbone = model.language_model.model
    torch.manual_seed(0)
    hidden = torch.randn(1, 12, model.config.text.hidden_size)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 2, 3, 4, 9, 10, 11]])
    mask = torch.ones(12, 12, dtype=torch.bool).tril()
    if tree:
        mask[6:9, 2:6] = False  # a second branch
    cos, sin = backbone.rotary_emb(hidden, position_ids=positions)
    layer = backbone.layers[trainer.LOOKUP_HEAD[0]]
    weights = {}
    for implementation in (trainer.GUIDED_ATTENTION, "eager"):
        model.config.text._attn_implementation = implementation
        attention = layer.self_attn
        normed = layer.input_layernorm(hidden)
        if implementation == "eager":
            given = torch.where(mask, 0.0, float("-inf"))[None, None]
        else:
            given = mask[None, None] if tree else None
        _, weights[implementation] = attention(normed, (cos, sin), given)
    rows = torch.tensor([0, 5, 7, 11])
    log_probs = guides.capture.log_probs(*trainer.LOOKUP_HEAD, 0, rows)
    assert torch.allclose(log_probs.exp(), weights["eager"][0, trainer.LOOKUP_HEAD[1], rows], atol=1e-6)


def test_a_conversation_with_images_added_later_is_the_transcript_a_conversation_feeds(trainer, examples):
    """The last images join in a later turn, labelled after the others, as `/images` adds them: the
    sequence is the template's whole transcript of that conversation."""
    from hae_testing.data import conversation_sets
    from hae_cli.model.phi3v.prompt import chat_text, encode_prompt_text, story_message

    rng = random.Random(5)
    for size, added, at in ((3, 1, 1), (6, 2, 2), (8, 2, 4)):
        image_ids = rng.sample(examples.captioned_ids, size)
        turns = conversation_sets.conversation(image_ids, 5, "train", rng, examples.by_image)
        sequence = examples.conversation(image_ids, turns, added=added, added_at=at)
        shown = size - added
        messages = []
        for t, turn in enumerate(turns):
            content = (story_message(turn.question, shown) if t == 0 else
                       story_message(turn.question, added, first=shown + 1) if t == at else turn.question)
            messages += [{"role": "user", "content": content}, {"role": "assistant", "content": turn.answer}]
        whole = encode_prompt_text(examples.tokenizer, chat_text(examples.tokenizer, messages), [examples.slots] * size)
        assert sequence.input_ids.tolist() == whole.input_ids.tolist()[:-1]
    config = trainer.TrainConfig(added_images_share=1.0)
    for _ in range(8):
        sequence = trainer.conversation_example(examples, config, rng)
        ids = sequence.input_ids.tolist()
        shown = max(-i for i in ids[: ids.index(examples.end_id)] if i < 0)
        assert shown < len(sequence.image_ids)
        rows = (sequence.labels != -100).nonzero().squeeze(-1)[0::2].tolist()
        first_after = next(r for r in rows if min(ids[:r]) < -shown)
        assert int(sequence.answer_image[first_after]) > shown, "the first question after them asks about one"
