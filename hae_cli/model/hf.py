"""The model interface over transformers' native vision-language classes: what Qwen2-VL, the
LLaVA family, Idefics3/SmolVLM, InternVL, Mistral 3, Gemma 3 and Qwen3-VL share.

Everything model-specific is the family's own transformers code: `AutoModelForImageTextToText`
loads the checkpoint, the family's processor (`load_processor`) resizes and normalises images,
renders the chat template and expands each image placeholder into the image's tokens, and the
model's `get_image_features` runs the vision tower. What hae adds is around that: the prompt's
text with each placeholder replaced by the processor's expansion (`text_replacement_offsets`),
tokenized whole as the processor tokenizes it, each token tagged by where it begins (inside
which image's expansion, if any); the decoder walked layer by layer (`run_decoder`), with the
family's per-layer rules; and chat turns appended to a kept cache.

A family folder subclasses `HFVisionLanguageModel` with the facts of its layout: where its text
decoder sits, its layers' rules (`layer_rules`), which token receives the features, which of an
image's tokens are its overview (a global or base view) and which are separators, and how to
draw an image's views (`image_cells`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hae_cli.cache.modality import Modality
from hae_cli.checks import finite_weights
from hae_cli.errors import CheckpointError
from hae_cli.model.decoder import LayerRule, TextBackbone
from hae_cli.model.image_file import check_aspect_ratio, image_name, load_image
from hae_cli.model.interface import PromptTokens, UserTurn, VisionLanguageModel
from hae_cli.model.limits import ModelLimits

MOST_ASPECT_RATIO = 200  # Qwen2-VL's processor's own bound; LLaVA's would resize 20000x1 to 6,720,000x336
_ANSWER = "\ue000"  # stands for the last answer while the template renders the next turn


@dataclass
class HFImage:
    """An image as a native family takes it: the RGB picture (the processor reads it with the
    prompt) and how the last prompt it was encoded in cut it (`layout`, set by `prompt`)."""

    picture: object  # PIL.Image.Image
    layout: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.layout.get("tokens", 0)


@dataclass
class ImageRun:
    """The tokens one image placeholder became: `ids`, and the processor's replacement text."""

    ids: list[int]
    replacement: str


class HFVisionLanguageModel(VisionLanguageModel):
    """A native transformers VLM behind the model interface (see the module docstring)."""

    end_of_turn: tuple[str, ...] = ()  # tokens that close an assistant turn, besides the EOS
    processor_kwargs: dict = {}  # the image options, as the processor's call-time settings (set by `load`)

    def __init__(self, model, processor, folder: Path, name: str) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.folder, self.name = Path(folder), name
        self.config = model.config
        self.text_config = model.config.get_text_config()
        self.num_layers = self.text_config.num_hidden_layers
        text = self.text_model()
        self.backbone = TextBackbone(text.layers, text.rotary_emb, text.norm, model.lm_head, text.embed_tokens,
                                     layer_position_ids=self.layer_position_ids, rules=self.layer_rules())
        self.image_token_id = self.feature_token_id()
        context = self.text_config.max_position_embeddings
        self.limits = ModelLimits(name="this checkpoint", max_crops=1, max_images=None, context_tokens=context,
                                  context_reason="its max_position_embeddings")

    @classmethod
    def load(cls, folder, device, dtype, *, name: str, options: dict[str, int] | None = None, on_progress=None):
        from transformers import AutoModelForImageTextToText

        from hae_cli.cache.attention import register_attention
        from hae_cli.model.hf_processor import load_processor

        options = cls.checked_options(options)
        progress = on_progress or (lambda message: None)
        progress(f"loading the processor from {folder}")
        try:
            processor = load_processor(folder)
        except ImportError as error:  # a dependency the family's processor needs
            raise CheckpointError(f"{folder}: the {cls.family} processor cannot be built: {error}") from None
        processor_kwargs = {}
        for option, value in options.items():
            processor_kwargs.update(cls.image_option_kwargs(processor, option, value))
        progress(f"loading weights from {folder} ({device}, {str(dtype).removeprefix('torch.')})")
        try:
            model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype).to(device).eval()
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            message = " ".join(str(error).split())[:300]
            raise CheckpointError(f"{folder}: cannot load the {cls.family} checkpoint: {message}") from None
        finite_weights(dict(model.named_parameters()), folder)
        model.config.get_text_config()._attn_implementation = register_attention()  # the decoder only
        loaded = cls(model, processor, folder, name)
        loaded.processor_kwargs = processor_kwargs
        return loaded

    # --- the family's facts ---

    def text_model(self):
        """The text decoder (`layers`, `rotary_emb`, `norm`, `embed_tokens`)."""
        return self.model.model.language_model

    def layer_position_ids(self, position_ids: torch.Tensor) -> torch.Tensor | None:
        return position_ids

    def layer_rules(self) -> list[LayerRule] | None:
        """Each decoder layer's rotary embedding, window and image blocks (None: all plain)."""
        return None

    @classmethod
    def image_option_kwargs(cls, processor, option: str, value: int) -> dict:
        """One of the family's `image_options` as its processor's own call-time setting (the
        processor's defaults would override the image processor's attributes)."""
        raise NotImplementedError(option)

    def vision_features(self, output) -> torch.Tensor:
        """`[slots, D]` from what `get_image_features` returned: the features each slot receives."""
        return torch.cat([f.reshape(-1, f.shape[-1]) for f in output.pooler_output])

    def feature_token_id(self) -> int:
        """The token whose slots receive the image features: the processor's placeholder, unless
        the family expands it into another (Gemma 3's `<start_of_image>` -> `<image_soft_token>`)."""
        return self.tokenizer.convert_tokens_to_ids(self.processor.image_token)

    def tag_run(self, run: ImageRun, layout: dict) -> tuple[list[int], list[bool]]:
        """Per token of an image's run: its modality and whether it is the image's overview.
        Default: the placeholder's feature tokens are IMAGE, everything else in the run
        (view names, markers) a SEPARATOR; no overview."""
        modality = [int(Modality.IMAGE if t == self.image_token_id else Modality.SEPARATOR) for t in run.ids]
        return modality, [False] * len(run.ids)

    def layout_of(self, run: ImageRun, image_inputs: dict, index: int, count: int, picture) -> dict:
        """How image `index` (of `count` in its prompt; `picture`, the RGB image) was cut, as JSON."""
        return {"tokens": len(run.ids)}

    # --- the interface ---

    @property
    def stop_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        eos = self.model.generation_config.eos_token_id
        ids |= set(eos) if isinstance(eos, list) else {eos}
        for token in self.end_of_turn:
            token_id = self.tokenizer.convert_tokens_to_ids(token)
            if token_id is not None and token_id != self.tokenizer.unk_token_id:
                ids.add(token_id)
        return {i for i in ids if i is not None}

    def read_image(self, source) -> HFImage:
        if isinstance(source, HFImage):
            return source
        picture = load_image(source)
        check_aspect_ratio(picture, image_name(source), MOST_ASPECT_RATIO, f"too thin a strip for {self.family}'s "
                           "processor (Qwen2-VL's refuses one; others shrink it to a sliver or grow it to millions "
                           "of pixels)")
        return HFImage(picture)

    def image_layout(self, image: HFImage) -> dict:
        return dict(image.layout)

    def image_features(self, images: list[HFImage]) -> list[torch.Tensor]:
        """The vision tower's output for `images` as one prompt holds them (some families cut
        an image differently when it is not alone), split per image."""
        if not images:
            return []
        inputs, runs = self._expand(images)
        get = self.model.model.get_image_features
        accepted = inspect.signature(get).parameters
        kwargs = {k: v.to(self.device) for k, v in inputs.items() if k in accepted and k != "pixel_values"}
        pixels = inputs["pixel_values"].to(self.device, self.dtype)
        with torch.inference_mode():
            features = self.vision_features(get(pixels, **kwargs))
        counts = [sum(1 for t in run.ids if t == self.image_token_id) for run in runs]
        if sum(counts) != features.shape[0]:
            raise RuntimeError(f"{self.family}: {features.shape[0]} image features for {sum(counts)} image tokens")
        return list(features.split(counts))

    def prompt(self, turn: UserTurn, images: list[HFImage]) -> PromptTokens:
        rendered = self._render([self._user(turn)], generation=True)
        return self._encoded(rendered, images, turn.first_image, self._adds_bos(rendered))

    def next_turn(self, history: list[tuple[UserTurn, str]], turn: UserTurn, images: list[HFImage]) -> PromptTokens:
        """The ids the template gives the whole transcript after the last answer, the answer's
        own ids being those generated. A template that rewrites past turns (OneVision's
        `assistant \\n`) rewrites only what the cache already holds: it is kept as fed."""
        messages = []
        for past, answer in history:
            messages += [self._user(past), {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        messages[-1]["content"][0]["text"] = _ANSWER
        whole = self._render(messages + [self._user(turn)], generation=True)
        cut = whole.rindex(_ANSWER)
        before = whole[:cut] + history[-1][1]
        after = whole[cut + len(_ANSWER):]
        adds = self._adds_bos(whole)
        fed = self.tokenizer(before, add_special_tokens=adds).input_ids
        tokens = self._encoded(before + after, images, turn.first_image, adds, fed)
        if tokens is None:  # the answer's end merged with what follows: the new text alone
            tokens = self._encoded(after, images, turn.first_image, False)
        return tokens

    def embed(self, tokens: PromptTokens, images: list[HFImage], features: list[torch.Tensor] | None = None,
              first_image: int = 1) -> torch.Tensor:
        """Text embeddings with the image features written over the image token slots, in order
        (the families' own `masked_scatter`)."""
        ids = tokens.input_ids.to(self.device)
        slots = ids == self.image_token_id
        embeds = self.backbone.embed_tokens(torch.where(slots, 0, ids))
        if bool(slots.any()):
            if not images:
                raise ValueError("prompt has image slots but no images were given")
            features = features if features is not None else self.image_features(images)
            stacked = torch.cat(list(features)).to(embeds.device, embeds.dtype)
            if stacked.shape[0] != int(slots.sum()):
                raise ValueError(f"{int(slots.sum())} image slots for {stacked.shape[0]} image features")
            embeds = embeds.clone()
            embeds[slots] = stacked
        return embeds.unsqueeze(0)

    # --- internals ---

    def _user(self, turn: UserTurn) -> dict:
        """A user message in the processor's content form: each image (after its label when
        `labelled`), then the text. Templates that gather a message's images first (LLaVA) put
        the labels after them."""
        content = []
        for k in range(turn.first_image, turn.first_image + turn.images):
            if turn.labelled:
                content.append({"type": "text", "text": f"Image {k}: "})
            content.append({"type": "image"})
            if turn.labelled:
                content.append({"type": "text", "text": "\n"})
        content.append({"type": "text", "text": turn.text})
        return {"role": "user", "content": content}

    def _render(self, messages: list[dict], generation: bool) -> str:
        return self.processor.apply_chat_template(messages, add_generation_prompt=generation, tokenize=False)

    def _adds_bos(self, rendered: str) -> bool:
        """The tokenizer's BOS unless the template wrote it (`apply_chat_template(tokenize=True)`'s rule)."""
        bos = self.tokenizer.bos_token
        return not (bos and rendered.startswith(bos))

    def _expand(self, images: list[HFImage]) -> tuple[dict, list[ImageRun]]:
        """The processor on the images alone, one placeholder each, grouped as one prompt: its
        pixel inputs, and the run of tokens each placeholder became."""
        text = self.processor.image_token * len(images)
        out = self.processor(text=[text], images=[[image.picture for image in images]], add_special_tokens=False,
                             return_tensors="pt", return_text_replacement_offsets=True, **self.processor_kwargs)
        runs = [ImageRun(self.tokenizer(entry["replacement"], add_special_tokens=False).input_ids, entry["replacement"])
                for entry in out.pop("text_replacement_offsets")[0]]
        return dict(out), runs

    def _encoded(self, text: str, images: list[HFImage], first_image: int, add_special_tokens: bool,
                 fed: list[int] | None = None) -> PromptTokens | None:
        """`text` as the family's processor encodes it: the last `len(images)` image placeholders
        replaced by their expansion and the whole tokenized at once (so ids merge across an image's
        edges exactly as the processor's do: Gemma 3's expansion begins and ends with blank
        lines); every token tagged, a token that begins inside an image's expansion being
        that image's. `fed`: ids already in the cache, which the encoding must begin with (None
        if it does not); the rest is returned."""
        pieces = text.split(self.processor.image_token)
        kept = len(pieces) - 1 - len(images)  # earlier images' placeholders: already in the cache
        if kept < 0:
            raise ValueError(f"{len(pieces) - 1} image placeholders for {len(images)} images")
        inputs, runs = self._expand(images) if images else ({}, [])
        expanded, spans = self.processor.image_token.join(pieces[: kept + 1]), []
        for run, piece in zip(runs, pieces[kept + 1:]):
            spans.append((len(expanded), len(expanded) + len(run.replacement)))
            expanded += run.replacement + piece
        encoding = self.tokenizer(expanded, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        ids, offsets = encoding.input_ids, encoding.offset_mapping
        if fed is not None:
            if ids[: len(fed)] != fed:
                return None
            ids, offsets = ids[len(fed):], offsets[len(fed):]
        modality, image_id, overview = [int(Modality.TEXT)] * len(ids), [0] * len(ids), [False] * len(ids)
        for k, ((begin, end), run, image) in enumerate(zip(spans, runs, images)):
            # an added token (a BOS) spans no text: it is never an image's
            slots = [i for i, (start, stop) in enumerate(offsets) if begin <= start < end and stop > start]
            run = ImageRun([ids[i] for i in slots], run.replacement)
            image.layout = self.layout_of(run, inputs, k, len(images), image.picture)
            tags, views = self.tag_run(run, image.layout)
            for i, tag, view in zip(slots, tags, views):
                modality[i], image_id[i], overview[i] = tag, first_image + k, view
        counts = [sum(1 for i in image_id if i == first_image + k) for k in range(len(images))]
        return PromptTokens(
            torch.tensor(ids, dtype=torch.long), torch.tensor(modality, dtype=torch.int8),
            torch.tensor(image_id, dtype=torch.int16), counts, torch.tensor(overview, dtype=torch.bool),
            self.prompt_extra(ids, inputs, runs),
        )

    def prompt_extra(self, ids: list[int], image_inputs: dict, runs: list[ImageRun]) -> dict[str, torch.Tensor]:
        """Family data that travels with the ids (sliced with them), e.g. rotary positions."""
        return {}
