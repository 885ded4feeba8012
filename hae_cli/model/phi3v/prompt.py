"""Phi-3.5-V's chat prompt as token ids, with every `<|image_k|>` expanded to image k's slots and
every slot tagged with its modality, so the cache can treat text, visual features and
separators differently from the first token on. The placeholders, the image labels and the
turn text are Phi-3.5-V's template facts; they live here alone."""

from __future__ import annotations

import re

import torch

from hae_cli.cache.modality import Modality
from hae_cli.errors import InputError
from hae_cli.model.interface import PromptTokens
from hae_cli.model.phi3v.image import ProcessedImage

IMAGE_PLACEHOLDER = re.compile(r"<\|image_(\d+)\|>")


def user_message(question: str, num_images: int) -> str:
    """The user turn: the question as written if it places its images itself, else one
    placeholder per image on its own line before the question (the official examples)."""
    return _images_then(question, num_images, "<|image_{k}|>\n")


def story_message(instruction: str, num_images: int, first: int = 1) -> str:
    """The user turn for a multi-image task: each placeholder after its label ("Image 2: "),
    then the instruction. The labels let the caption of image k find image k's tokens by
    what they follow rather than by counting blocks, and the demo model is trained on
    exactly this form. An instruction that places its images itself is kept as written.
    `first`: the first image's number (a later turn of a conversation continues the count)."""
    return _images_then(instruction, num_images, "Image {k}: <|image_{k}|>\n", first)


def _images_then(text: str, num_images: int, line: str, first: int = 1) -> str:
    """`text` as written if it places its images itself, else `line` (with `{k}`) for each
    image first..first+n-1, then `text`."""
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    if IMAGE_PLACEHOLDER.search(text):
        return text
    return "".join(line.format(k=k) for k in range(first, first + num_images)) + text


def build_prompt(tokenizer, user_text: str, images: list[ProcessedImage]) -> PromptTokens:
    """Render the chat template for one user turn and tokenise it, expanding `<|image_k|>` to
    `images[k-1].num_tokens` slots (`encode_prompt_text`)."""
    return encode_prompt_text(tokenizer, chat_text(tokenizer, [{"role": "user", "content": user_text}]), images)


def chat_text(tokenizer, messages: list[dict]) -> str:
    """The chat template over `messages`, with the assistant's generation prompt after a user turn."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=messages[-1]["role"] == "user")


def next_turn_text(tokenizer, messages: list[dict], user_text: str) -> str:
    """What a new user turn adds to a transcript whose last message is the assistant's answer:
    the text that follows the answer itself (for Phi-3.5-V `<|end|>\n<|user|>\n...<|end|>\n
    <|assistant|>\n`), read off the chat template so the transcript is the one the template
    renders for the whole conversation."""
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("the transcript must end with the assistant's answer")
    fed = chat_text(tokenizer, messages[:-1]) + messages[-1]["content"]
    whole = chat_text(tokenizer, [*messages, {"role": "user", "content": user_text}])
    if not whole.startswith(fed):
        raise ValueError("the chat template does not render a conversation as its turns one after another")
    return whole[len(fed) :]


def encode_prompt_text(
    tokenizer, rendered: str, images: list[ProcessedImage], *, first_image: int = 1, opens_chunk: bool = True
) -> PromptTokens:
    """Tokenise rendered chat text, expanding `<|image_k|>` (k = `first_image`.. in order of
    `images`) to image k's slots.

    The official processor (`processing_phi3_v.py`) splits the rendered prompt at the image
    tags and encodes every text chunk on its own with the tokenizer's default special tokens
    (`tokenizer(chunk).input_ids`), empty chunks included; so with Phi-3.5-V's tokenizer
    (`add_bos_token: true`) each chunk, also those after an image, starts with `<s>`, and a
    1-image prompt holds two. `encode_chunk` is that rule, kept here alone, so the ids match
    what the model was trained on. `opens_chunk=False` encodes text that continues a chunk
    already fed (a later turn of a conversation): its first chunk gets no special tokens, so
    the turns fed one after another are the ids of the whole transcript.
    """
    pieces = IMAGE_PLACEHOLDER.split(rendered)
    texts, ids = pieces[0::2], [int(k) for k in pieces[1::2]]
    _check_image_ids(ids, len(images), first_image)

    input_ids: list[torch.Tensor] = []
    modality: list[torch.Tensor] = []
    image_id: list[torch.Tensor] = []
    overview: list[torch.Tensor] = []

    for i, text in enumerate(texts):
        token_ids = encode_chunk(tokenizer, text) if opens_chunk or i else tokenizer(text, add_special_tokens=False).input_ids
        input_ids.append(torch.tensor(token_ids, dtype=torch.long))
        modality.append(torch.full((len(token_ids),), int(Modality.TEXT), dtype=torch.int8))
        image_id.append(torch.zeros(len(token_ids), dtype=torch.int16))
        overview.append(torch.zeros(len(token_ids), dtype=torch.bool))
        if i < len(ids):
            k = ids[i]
            image = images[k - first_image]
            if image.modalities.numel() != image.num_tokens:
                tags = image.modalities.numel()
                raise ValueError(f"image {k}: {tags} modality tags for {image.num_tokens} slots")
            input_ids.append(torch.full((image.num_tokens,), -k, dtype=torch.long))
            modality.append(image.modalities.to(torch.int8))
            image_id.append(torch.full((image.num_tokens,), k, dtype=torch.int16))
            known = image.overview is not None
            overview.append(image.overview.bool() if known else torch.zeros(image.num_tokens, dtype=torch.bool))

    return PromptTokens(
        input_ids=torch.cat(input_ids),
        modality=torch.cat(modality),
        image_id=torch.cat(image_id),
        image_token_counts=[image.num_tokens for image in images],
        overview=torch.cat(overview),
    )


def encode_chunk(tokenizer, text: str) -> list[int]:
    """One text chunk as the official processor encodes it: the tokenizer's default special
    tokens (BOS first exactly when the tokenizer adds it by default), nothing stripped."""
    return list(tokenizer(text).input_ids)


def _check_image_ids(ids: list[int], num_images: int, first: int = 1) -> None:
    """Placeholders must be exactly <|image_first|>..<|image_n|>, each once, n = images given
    (a later turn of a conversation numbers its images after the earlier turns')."""
    given = "no images were given" if num_images == 0 else (
        "only 1 image was given" if num_images == 1 else f"only {num_images} images were given"
    )
    seen: set[int] = set()
    last = first + num_images - 1
    for k in ids:
        if k == 0:
            raise InputError("prompt names <|image_0|>, but placeholders start at <|image_1|>")
        if k < first:
            raise InputError(f"prompt names <|image_{k}|>, an image of an earlier turn; this turn's images start at <|image_{first}|>")
        if k > last:
            raise InputError(f"prompt names <|image_{k}|> but {given}")
        if k in seen:
            raise InputError(f"prompt names <|image_{k}|> more than once; use each image once")
        seen.add(k)
    missing = [k for k in range(first, last + 1) if k not in seen]
    if missing:
        names = ", ".join(f"<|image_{k}|>" for k in missing)
        plural = "s" if num_images != 1 else ""
        raise InputError(f"{num_images} image{plural} given but the prompt has no {names}")
