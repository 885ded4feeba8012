"""Prompt building (placeholder expansion, modality and image tags, id checks) and the tiny
tokenizer it is tested with."""

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from hae_cli.cache.modality import Modality
from hae_cli.errors import InputError
from hae_cli.model.phi3v.image import (
    ImageProcessorConfig,
    ProcessedImage,
    image_token_modalities,
    preprocess,
    tokens_per_image,
)
from hae_cli.model.interface import PromptTokens
from hae_cli.model.phi3v.prompt import build_prompt, story_message, user_message
from hae_testing.checkpoints.phi3v_tokenizer import CHAT_TOKENS, build_tiny_tokenizer

WORDS = ["Image 1: a red circle.", "Image 2", "what", "is", "in", "this", "picture", "?", "compare them"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(WORDS)


def fake_image(h, w, grid=2):
    """Token layout only: the prompt never looks at pixels."""
    return ProcessedImage(
        pixel_values=torch.empty(0),
        h_crops=h,
        w_crops=w,
        num_tokens=tokens_per_image(h, w, grid),
        modalities=image_token_modalities(h, w, grid),
    )


def runs(values):
    """[(value, length)] of consecutive equal values."""
    out = []
    for v in values.tolist():
        if out and out[-1][0] == v:
            out[-1][1] += 1
        else:
            out.append([v, 1])
    return [tuple(r) for r in out]


# ----------------------------------------------------------------- user_message


def test_user_message_adds_placeholders_only_when_absent():
    assert user_message("what is this?", 2) == "<|image_1|>\n<|image_2|>\nwhat is this?"
    assert user_message("what is this?", 0) == "what is this?"
    own = "compare <|image_2|> and <|image_1|>"
    assert user_message(own, 2) == own


def test_story_message_labels_each_image_before_its_slots(tokenizer):
    assert story_message("Describe each image in order.", 2) == (
        "Image 1: <|image_1|>\nImage 2: <|image_2|>\nDescribe each image in order."
    )
    own = "first <|image_1|> then <|image_2|>"
    assert story_message(own, 2) == own
    images = [fake_image(1, 1), fake_image(1, 1)]
    prompt = build_prompt(tokenizer, story_message("go", 2), images)
    # each image's block starts right after its own label's ": "
    for k in (1, 2):
        first_slot = int((prompt.input_ids == -k).nonzero()[0])
        before = tokenizer.decode(prompt.input_ids[first_slot - 3 : first_slot].tolist())
        assert before.replace(" ", "").lower().endswith(f"image{k}:")


# ----------------------------------------------------------------- expansion and tags


def test_multi_image_expansion_in_order(tokenizer):
    images = [fake_image(1, 1), fake_image(2, 1), fake_image(1, 3)]
    counts = [i.num_tokens for i in images]
    assert len(set(counts)) == 3
    prompt = build_prompt(tokenizer, user_message("what is in this picture?", 3), images)

    assert prompt.input_ids.dtype == torch.long
    assert prompt.modality.dtype == torch.int8 and prompt.image_id.dtype == torch.int16
    assert len(prompt.input_ids) == len(prompt.modality) == len(prompt.image_id)
    assert prompt.image_token_counts == counts

    image_runs = [(v, n) for v, n in runs(prompt.input_ids) if v < 0]
    assert image_runs == [(-1, counts[0]), (-2, counts[1]), (-3, counts[2])]
    for k, image in enumerate(images, start=1):
        slots = prompt.input_ids == -k
        assert (prompt.image_id[slots] == k).all() and int(slots.sum()) == image.num_tokens
        assert torch.equal(prompt.modality[slots], image.modalities)
    text = prompt.input_ids >= 0
    assert (prompt.image_id[text] == 0).all() and (prompt.modality[text] == Modality.TEXT).all()
    assert torch.equal(text, prompt.image_id == 0)

    # The official rule: every text chunk between placeholders starts with <s> (add_bos_token).
    expected = official_ids(tokenizer, "<|user|>\n<|image_1|>\n<|image_2|>\n<|image_3|>\nwhat is in this picture?<|end|>\n<|assistant|>\n")
    assert prompt.input_ids[text].tolist() == [i for i in expected if i >= 0]
    first_image = int(torch.nonzero(~text)[0])
    head = tokenizer.convert_ids_to_tokens(prompt.input_ids[:first_image].tolist())
    assert head == ["<s>", "<|user|>", "\n"]

    by_modality = prompt.counts_by_modality()
    assert by_modality["text"] == sum(1 for i in expected if i >= 0)
    assert by_modality["image"] + by_modality["separator"] == sum(counts)
    separators = sum(int((i.modalities == Modality.SEPARATOR).sum()) for i in images)
    assert by_modality["separator"] == separators > 0
    assert sum(by_modality.values()) == len(prompt.input_ids)


def test_placeholders_out_of_order_follow_their_ids(tokenizer):
    images = [fake_image(1, 1), fake_image(2, 2)]
    prompt = build_prompt(tokenizer, "compare <|image_2|> and <|image_1|>", images)
    image_runs = [(v, n) for v, n in runs(prompt.input_ids) if v < 0]
    assert image_runs == [(-2, images[1].num_tokens), (-1, images[0].num_tokens)]
    assert prompt.image_token_counts == [images[0].num_tokens, images[1].num_tokens]


def test_real_preprocessed_images(tokenizer):
    config = ImageProcessorConfig(num_crops=4, crop_size=28, patch_size=14)
    images = [preprocess(Image.new("RGB", size), config) for size in [(60, 20), (20, 20)]]
    prompt = build_prompt(tokenizer, user_message("compare them", 2), images)
    assert prompt.image_token_counts == [i.num_tokens for i in images]
    assert int((prompt.image_id > 0).sum()) == sum(prompt.image_token_counts)
    # each image's overview (global view) tags land on its own slots, nowhere else
    for k, image in enumerate(images, start=1):
        assert torch.equal(prompt.overview[prompt.image_id == k], image.overview)
    assert int(prompt.overview.sum()) == sum(int(i.overview.sum()) for i in images) == 2 * config.merged_grid**2


def test_text_only_prompt(tokenizer):
    prompt = build_prompt(tokenizer, "what is this?", [])
    assert prompt.image_token_counts == [] and (prompt.input_ids >= 0).all()
    assert prompt.counts_by_modality()["image"] == 0


# ----------------------------------------------------------------- id errors


@pytest.mark.parametrize(
    "text,num_images,message",
    [
        ("<|image_1|> what", 2, "no <|image_2|>"),  # missing id
        ("<|image_1|> and <|image_1|>", 1, "<|image_1|> more than once"),  # duplicate
        ("<|image_1|> <|image_2|> <|image_3|>", 2, "names <|image_3|> but only 2 images"),  # id > n
        ("<|image_2|> what", 1, "names <|image_2|> but only 1 image was given"),
        ("<|image_1|> what", 0, "but no images were given"),  # count mismatch
        ("<|image_2|> <|image_3|>", 3, "no <|image_1|>"),
        ("<|image_0|> <|image_1|>", 1, "<|image_0|>"),
    ],
)
def test_bad_image_ids(tokenizer, text, num_images, message):
    images = [fake_image(1, 1) for _ in range(num_images)]
    with pytest.raises(InputError) as info:
        build_prompt(tokenizer, text, images)
    assert message in str(info.value) and "\n" not in str(info.value)


# ----------------------------------------------------------------- BOS: the official rule


def official_ids(tokenizer, rendered: str, counts: dict[int, int] | None = None) -> list[int]:
    """What `processing_phi3_v.py` builds, computed apart from `build_prompt`: split at the
    image tags, each chunk encoded by the backend with <s> first when the tokenizer's
    `add_bos_token` is on, `-k` x slots for image k in between (one slot if no counts)."""
    import re

    chunks = re.split(r"<\|image_\d+\|>", rendered)
    tags = [int(t) for t in re.findall(r"<\|image_(\d+)\|>", rendered)]
    bos = [tokenizer.bos_token_id] if tokenizer.add_bos_token else []
    ids: list[int] = []
    for i, chunk in enumerate(chunks):
        ids += bos + tokenizer.backend_tokenizer.encode(chunk, add_special_tokens=False).ids
        if i < len(tags):
            ids += [-tags[i]] * (counts or {}).get(tags[i], 1)
    return ids


@pytest.mark.parametrize("add_bos", [True, False])
@pytest.mark.parametrize("num_images", [0, 1, 2, 3])
@pytest.mark.parametrize("message", [user_message, story_message])
def test_each_text_chunk_is_encoded_as_the_official_processor_does(add_bos, num_images, message):
    tok = build_tiny_tokenizer(WORDS)
    tok.add_bos_token = add_bos
    images = [fake_image(1, k) for k in range(1, num_images + 1)]
    user_text = message("what is in this picture?", num_images)
    prompt = build_prompt(tok, user_text, images)
    rendered = tok.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True)
    counts = {k: image.num_tokens for k, image in enumerate(images, start=1)}
    assert prompt.input_ids.tolist() == official_ids(tok, rendered, counts)
    bos = int((prompt.input_ids == tok.bos_token_id).sum())
    assert bos == ((num_images + 1) if add_bos else 0)  # one per text chunk
    # tags stay aligned with the extra BOS rows: text is text, image k is k, in order
    for k, image in enumerate(images, start=1):
        slots = (prompt.image_id == k).nonzero().squeeze(-1)
        assert slots.numel() == image.num_tokens and (slots.diff() == 1).all()
        assert (prompt.input_ids[slots] == -k).all() and torch.equal(prompt.modality[slots], image.modalities)
        if add_bos:  # the chunk after image k opens with <s>
            assert int(prompt.input_ids[slots[-1] + 1]) == tok.bos_token_id
            assert prompt.modality[slots[-1] + 1] == Modality.TEXT and prompt.image_id[slots[-1] + 1] == 0
    text = prompt.input_ids >= 0
    assert (prompt.modality[text] == Modality.TEXT).all() and (prompt.image_id[text] == 0).all()


def test_adjacent_images_get_the_empty_chunk_between_them():
    """The official processor encodes the empty chunk between two tags too: one <s>."""
    tok = build_tiny_tokenizer(WORDS)
    prompt = build_prompt(tok, "<|image_1|><|image_2|>what", [fake_image(1, 1), fake_image(1, 1)])
    last_of_first = int((prompt.image_id == 1).nonzero().max())
    assert int(prompt.input_ids[last_of_first + 1]) == tok.bos_token_id
    assert int(prompt.input_ids[last_of_first + 2]) == -2


# ----------------------------------------------------------------- tiny tokenizer


def test_tiny_tokenizer_ids(tokenizer):
    vocab = tokenizer.get_vocab()
    assert (vocab["<unk>"], vocab["<s>"], vocab["</s>"]) == (0, 1, 2)
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert vocab["image"] == 3 and "Image" not in vocab  # words lower-cased, in order
    pad = tokenizer.pad_token_id
    assert tokenizer.pad_token == "<|endoftext|>" and pad > vocab["\n"] > vocab["them"]
    assert [vocab[t] for t in CHAT_TOKENS] == list(range(pad + 1, pad + 5))
    assert len(vocab) == pad + 5


def test_tiny_tokenizer_text_and_chat_tokens(tokenizer):
    text = "Image 1: a red circle."
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(ids) == ["image", "1", ":", "a", "red", "circle", "."]
    assert tokenizer.decode(ids) == text.lower()
    assert tokenizer.encode("zebra", add_special_tokens=False) == [tokenizer.unk_token_id]
    assert tokenizer.encode("what\nis", add_special_tokens=False) == [
        tokenizer.convert_tokens_to_ids(t) for t in ["what", "\n", "is"]
    ]
    glued = tokenizer.encode("what<|end|><|assistant|>is", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(glued) == ["what", "<|end|>", "<|assistant|>", "is"]
    for token in CHAT_TOKENS:
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1


def test_tiny_tokenizer_round_trips_through_save_and_auto_load(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(loaded, name) == getattr(tokenizer, name), name
    messages = [{"role": "user", "content": "<|image_1|>\nwhat is this?"}]
    rendered = loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|user|>\n<|image_1|>\nwhat is this?<|end|>\n<|assistant|>\n"
    for token in CHAT_TOKENS:
        assert len(loaded.encode(token, add_special_tokens=False)) == 1
    text = "Image 1: a red circle."
    assert loaded.decode(loaded.encode(text, add_special_tokens=False)) == text.lower()

    images = [fake_image(1, 2)]
    a = build_prompt(tokenizer, user_message("what is this?", 1), images)
    b = build_prompt(loaded, user_message("what is this?", 1), images)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.modality, b.modality)
    assert isinstance(b, PromptTokens)
