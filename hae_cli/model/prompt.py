"""The chat prompt as token ids, with every `<|image_k|>` expanded to image k's slots and every
slot tagged with its modality, so the cache can treat text, visual features and separators
differently from the first token on."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from hae_cli.cache.modality import MODALITY_NAMES, Modality
from hae_cli.errors import InputError
from hae_cli.model.image import ProcessedImage

IMAGE_PLACEHOLDER = re.compile(r"<\|image_(\d+)\|>")


@dataclass
class PromptTokens:
    """A prompt ready for prefill.

    input_ids: [L]; image k's slots hold `-k` (the official processor's convention), which the
        model replaces by the image's features.
    modality: [L] int8 `Modality` per slot (TEXT, or IMAGE / SEPARATOR inside an image).
    image_id: [L] int16; k on image k's slots (features and separators), 0 on text.
    image_token_counts: slots per image, in image order (1..n).
    overview: [L] bool; True on each image's global-view features (its overview).
    """

    input_ids: torch.Tensor
    modality: torch.Tensor
    image_id: torch.Tensor
    image_token_counts: list[int]
    overview: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.overview is None:
            self.overview = torch.zeros(self.input_ids.numel(), dtype=torch.bool)

    def after_images(self) -> int:
        """Rows up to and including the last image's slots: the context that a question can
        arrive after (`generate(context_length=...)`)."""
        slots = (self.image_id > 0).nonzero()
        if not slots.numel():
            raise ValueError("the prompt has no images")
        return int(slots.max()) + 1

    def counts_by_modality(self) -> dict[str, int]:
        """Tokens of each modality, keyed by name, for the stats display."""
        return {MODALITY_NAMES[m]: int((self.modality == m).sum()) for m in Modality}


def user_message(question: str, num_images: int) -> str:
    """The user turn: the question as written if it places its images itself, else one
    placeholder per image on its own line before the question (the official examples)."""
    return _images_then(question, num_images, "<|image_{k}|>\n")


def story_message(instruction: str, num_images: int) -> str:
    """The user turn for a multi-image task: each placeholder after its label ("Image 2: "),
    then the instruction. The labels let the caption of image k find image k's tokens by
    what they follow rather than by counting blocks, and the demo model is trained on
    exactly this form. An instruction that places its images itself is kept as written."""
    return _images_then(instruction, num_images, "Image {k}: <|image_{k}|>\n")


def _images_then(text: str, num_images: int, line: str) -> str:
    """`text` as written if it places its images itself, else `line` (with `{k}`) for each
    image 1..n, then `text`."""
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    if IMAGE_PLACEHOLDER.search(text):
        return text
    return "".join(line.format(k=k) for k in range(1, num_images + 1)) + text


def build_prompt(tokenizer, user_text: str, images: list[ProcessedImage]) -> PromptTokens:
    """Render the chat template and tokenise it, expanding `<|image_k|>` to
    `images[k-1].num_tokens` slots.

    The official processor (`processing_phi3_v.py`) splits the rendered prompt at the image
    tags and encodes every text chunk on its own with the tokenizer's default special tokens
    (`tokenizer(chunk).input_ids`), empty chunks included; so with Phi-3.5-V's tokenizer
    (`add_bos_token: true`) each chunk, also those after an image, starts with `<s>`, and a
    1-image prompt holds two. `encode_chunk` is that rule, kept here alone, so the ids match
    what the model was trained on.
    """
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
    )
    pieces = IMAGE_PLACEHOLDER.split(rendered)
    texts, ids = pieces[0::2], [int(k) for k in pieces[1::2]]
    _check_image_ids(ids, len(images))

    input_ids: list[torch.Tensor] = []
    modality: list[torch.Tensor] = []
    image_id: list[torch.Tensor] = []
    overview: list[torch.Tensor] = []

    for i, text in enumerate(texts):
        token_ids = encode_chunk(tokenizer, text)
        input_ids.append(torch.tensor(token_ids, dtype=torch.long))
        modality.append(torch.full((len(token_ids),), int(Modality.TEXT), dtype=torch.int8))
        image_id.append(torch.zeros(len(token_ids), dtype=torch.int16))
        overview.append(torch.zeros(len(token_ids), dtype=torch.bool))
        if i < len(ids):
            k = ids[i]
            image = images[k - 1]
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


def _check_image_ids(ids: list[int], num_images: int) -> None:
    """Placeholders must be exactly <|image_1|>..<|image_n|>, each once, n = images given."""
    given = "no images were given" if num_images == 0 else (
        "only 1 image was given" if num_images == 1 else f"only {num_images} images were given"
    )
    seen: set[int] = set()
    for k in ids:
        if k == 0:
            raise InputError("prompt names <|image_0|>, but placeholders start at <|image_1|>")
        if k > num_images:
            raise InputError(f"prompt names <|image_{k}|> but {given}")
        if k in seen:
            raise InputError(f"prompt names <|image_{k}|> more than once; use each image once")
        seen.add(k)
    missing = [k for k in range(1, num_images + 1) if k not in seen]
    if missing:
        names = ", ".join(f"<|image_{k}|>" for k in missing)
        plural = "s" if num_images != 1 else ""
        raise InputError(f"{num_images} image{plural} given but the prompt has no {names}")
