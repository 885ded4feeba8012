"""The one interface between a vision-language model and everything above `hae_cli/model/`.

A model family (one folder here: `phi3v/`, ...) implements `VisionLanguageModel`: it reads
images its own way, renders its chat template with each token tagged (text, image feature,
separator; which image; the image's overview; where each image token sits in its picture),
embeds a prompt, gives each token its rotary position in the model's own shape, and runs its
decoder layer by layer so the cache can prune between layers. The API, conversations, the
benchmarks, the kept map and the CLI call only this; nothing above `hae_cli/model/` names a
family.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from hae_cli.cache.modality import MODALITY_NAMES, Modality
from hae_cli.errors import ConfigError
from hae_cli.model.decoder import DecoderOutput, TextBackbone, run_decoder
from hae_cli.model.limits import ModelLimits


@dataclass(frozen=True)
class UserTurn:
    """What a user says in one turn: `images` images (numbered `first_image`, ...), then `text`.

    `labelled`: each image after its label ("Image 2: "), so the text can name it; otherwise the
    images stand before the text as the family's own examples place them.
    """

    text: str
    images: int = 0
    first_image: int = 1
    labelled: bool = False


@dataclass
class PromptTokens:
    """Tokens to feed, each tagged for the cache.

    input_ids: [L] ids as the family's embedding reads them (an image's slots hold whatever the
        family uses there: Phi-3.5-V's `-k`, another family's image token id).
    modality: [L] int8 `Modality` per slot (TEXT, or IMAGE / SEPARATOR inside an image).
    image_id: [L] int16; k on image k's slots (features and separators), 0 on text.
    image_token_counts: slots per image, in image order.
    overview: [L] bool; True on each image's overview features (its global or base view).
    extra: family data that travels with the ids (sliced with them), e.g. token type ids.
    """

    input_ids: torch.Tensor
    modality: torch.Tensor
    image_id: torch.Tensor
    image_token_counts: list[int] = field(default_factory=list)
    overview: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.overview is None:
            self.overview = torch.zeros(self.input_ids.numel(), dtype=torch.bool)

    def __len__(self) -> int:
        return self.input_ids.numel()

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

    def rows(self, start: int, stop: int | None = None) -> "PromptTokens":
        """Rows `start:stop` (the image counts are the whole prompt's)."""
        part = slice(start, stop)
        return PromptTokens(
            self.input_ids[part], self.modality[part], self.image_id[part], list(self.image_token_counts),
            self.overview[part], {name: value[..., part] for name, value in self.extra.items()},
        )


def image_blocks(modality: torch.Tensor) -> torch.Tensor:
    """`[L]`: each contiguous run of image-feature slots numbered 0, 1, ...; -1 elsewhere (the
    blocks a layer with `LayerRule.image_blocks` lets see each other both ways)."""
    is_image = modality == Modality.IMAGE
    starts = is_image & ~torch.cat([torch.zeros(1, dtype=torch.bool), is_image[:-1]])
    return torch.where(is_image, starts.long().cumsum(0) - 1, -1)


@dataclass(frozen=True)
class PictureView:
    """One view of an image as the model saw it, cut into the cells its tokens stand for.

    `picture`: the view (a PIL image; None where only the geometry is wanted); `cols` x `rows`
    cells; `tiles`: (rows, cols) of the sub-images it is made of, whose edges are drawn;
    `row_separators`: each row of cells ends in a separator token; `separator`: the whole view
    is one separator token (Phi-3.5-V's `glb_GN`).
    """

    caption: str
    picture: Any
    cols: int
    rows: int
    tiles: tuple[int, int] = (1, 1)
    row_separators: bool = False
    separator: bool = False


@dataclass(frozen=True)
class ImageCells:
    """An image's views, and where each of its slots (prompt order) sits in them: `view[s]` (an index
    into `views`), `row[s]`, `col[s]`; `col` == the view's `cols` is the row's separator."""

    views: list[PictureView]
    view: Any  # np.ndarray [slots] int
    row: Any
    col: Any
    separator_names: str = ""  # what the family calls its separator tokens, for the legend


class VisionLanguageModel:
    """A loaded model of one family, behind the one interface (see the module docstring).

    Attributes every family sets: `name` (as the user named it), `folder`, `tokenizer`,
    `limits` (`ModelLimits`), `num_layers`, `text_config` (the decoder's transformers config),
    `backbone` (`TextBackbone`: the decoder's parts), `load_seconds`.
    """

    family: ClassVar[str] = ""  # its name, for messages
    model_types: ClassVar[tuple[str, ...]] = ()  # the config.json model_type(s) it serves
    # what `hae families` says of it
    image_tokens: ClassVar[str] = ""  # how an image becomes tokens
    overview: ClassVar[str] = ""  # what HAE's per-image floor draws on
    kept_views: ClassVar[str] = ""  # what --show-kept draws
    # the family's own image resolution settings, name -> what it sets (`--image-option NAME=N`)
    image_options: ClassVar[dict[str, str]] = {}

    name: str
    folder: Path
    tokenizer: Any
    limits: ModelLimits
    num_layers: int
    text_config: Any
    backbone: TextBackbone
    load_seconds: float = 0.0

    # --- loading ---

    @classmethod
    def load(cls, folder: Path, device: torch.device, dtype: torch.dtype, *, name: str,
             options: dict[str, int] | None = None, on_progress=None) -> "VisionLanguageModel":
        """Read the checkpoint in `folder` strictly; `options`: its image options (checked by
        `checked_options`); `on_progress(message)` hears what is being read."""
        raise NotImplementedError

    @classmethod
    def checked_options(cls, options: dict[str, int] | None) -> dict[str, int]:
        """`options` if each is one of the family's `image_options` with a whole value of at
        least 1; otherwise one line saying what the family takes."""
        options = dict(options or {})
        for option, value in options.items():
            if option not in cls.image_options:
                takes = ", ".join(cls.image_options) or "none"
                raise ConfigError(f"image option {option}: {cls.family} has no such option (its image options: {takes})")
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"image option {option}={value!r}: a whole number of at least 1")
        return options

    def at_crops(self, num_crops: int) -> "VisionLanguageModel":
        """The same weights reading images at `num_crops` crops: the fewer-pixels baseline
        ("why not just lower the resolution?"). A family without crops refuses."""
        raise ConfigError(f"{self.name} ({self.family}) reads images without crops: no fewer-crops setting")

    @property
    def device(self) -> torch.device:
        return self.backbone.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.lm_head.weight.dtype

    @property
    def stop_ids(self) -> set[int]:
        """Ids that end the assistant's turn."""
        raise NotImplementedError

    # --- images ---

    def read_image(self, source):
        """A path or PIL image -> what this family's embedding needs (`.num_tokens` slots)."""
        raise NotImplementedError

    def image_features(self, images: list) -> list[torch.Tensor]:
        """The vision tower's output per image, `[slots, hidden]`, in order."""
        raise NotImplementedError

    def image_layout(self, image) -> dict:
        """How the image was cut in the prompt it was last encoded in, as JSON (the kept map's
        `--json`, and what `image_cells` draws from)."""
        raise NotImplementedError

    def image_cells(self, picture, layout: dict) -> ImageCells:
        """The image's views as the model saw them (from the RGB `picture` it was read from, cut
        as `layout` says) and where each of its slots sits in them: what `--show-kept` draws."""
        raise NotImplementedError

    # --- prompts ---

    def prompt(self, turn: UserTurn, images: list) -> PromptTokens:
        """The chat template over one user turn, ready for the assistant's answer."""
        raise NotImplementedError

    def next_turn(self, history: list[tuple[UserTurn, str]], turn: UserTurn, images: list) -> PromptTokens:
        """What the chat template adds after the last answer of `history` for a new user `turn`
        (whose `images` are new): the rows to feed so the cache holds the whole transcript."""
        raise NotImplementedError

    def embed(self, tokens: PromptTokens, images: list, features: list[torch.Tensor] | None = None,
              first_image: int = 1) -> torch.Tensor:
        """Token embeddings `[1, L, hidden]` with each image's features at its slots (`features`
        from `image_features`, to skip the vision tower; `first_image`: the number of
        `images[0]`)."""
        raise NotImplementedError

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Text token embeddings `[1, q, hidden]` (a decode step's)."""
        return self.backbone.embed_tokens(ids.reshape(1, -1).to(self.device))

    # --- positions and the decoder ---

    def position_ids(self, tokens: PromptTokens, start: int) -> tuple[torch.Tensor, int]:
        """(the rotary position ids of `tokens`, fed after positions up to `start`, in the model's
        own shape with the sequence last; the position of the next token)."""
        count = len(tokens)
        return torch.arange(start, start + count, device=self.device)[None], start + count

    def decode_position_ids(self, position: int) -> torch.Tensor:
        """The rotary position ids of one decoded token at `position`."""
        return torch.tensor([[position]], device=self.device)

    def forward(self, embeds: torch.Tensor, position_ids: torch.Tensor, cache=None, attention_mask=None,
                logits_rows: int | None = 1, tokens: PromptTokens | None = None) -> DecoderOutput:
        """The decoder, layer by layer (the cache's `after_layer` may prune rows between layers).
        `tokens`: the prompt rows fed (their image runs, for layers with `image_blocks`, and what
        `layer_additions` adds)."""
        blocks = image_blocks(tokens.modality) if tokens is not None and self.backbone.sees_image_blocks() else None
        additions = self.layer_additions(tokens) if tokens is not None else None
        return run_decoder(self.backbone, embeds, position_ids, cache, attention_mask, logits_rows, image_blocks=blocks,
                           additions=additions)

    def layer_additions(self, tokens: PromptTokens) -> dict[int, torch.Tensor] | None:
        """What the family adds to given layers' outputs for these rows (layer -> `[1, L, hidden]`;
        Qwen3-VL's deepstack features), computed by `embed`; None: nothing."""
        return None

    # --- text ---

    def decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def check_loaded(loaded: object) -> None:
    """The model a run takes is what `load_model` returned, not its name."""
    if not isinstance(loaded, VisionLanguageModel):
        hint = f"; call load_model({loaded!r}) first" if isinstance(loaded, (str, os.PathLike)) else ""
        raise ConfigError(f"the model must be what load_model returns, got {type(loaded).__name__}{hint}")
