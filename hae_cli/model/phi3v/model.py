"""Phi-3.5-Vision behind the model interface: Microsoft's checkpoint layout, HD crops, its chat
template, token for token as the official code does it (`docs/FIDELITY.md`)."""

from __future__ import annotations

import copy

from dataclasses import replace
from pathlib import Path

import torch

from hae_cli.model.image_file import image_name, load_image
from hae_cli.model.interface import ImageCells, PromptTokens, UserTurn, VisionLanguageModel
from hae_cli.model.phi3v.checkpoint import load_checkpoint, load_tokenizer, model_limits
from hae_cli.model.phi3v.config import ModelConfig
from hae_cli.model.phi3v.limits import checkpoint_limits
from hae_cli.model.phi3v.image import (
    ImageProcessorConfig, ProcessedImage, check_shape, image_cells, preprocess, views_as_seen,
)
from hae_cli.model.phi3v.network import Phi3VForCausalLM
from hae_cli.model.phi3v.prompt import build_prompt, encode_prompt_text, next_turn_text, story_message, user_message


class Phi35Vision(VisionLanguageModel):
    family = "Phi-3.5-Vision"
    model_types = ("phi3_v",)
    image_tokens = "HD crops of 336 px + a global view, 2x2-merged CLIP patches, a sub_GN closing each row, a glb_GN"
    overview = "the global view"
    kept_views = "crops (after the HD transform), glb_GN, global view"
    image_options = {"num_crops": "most 336-pixel crops per image (HD transform), 144 tokens each (--num-crops)"}

    def __init__(self, network: Phi3VForCausalLM, tokenizer, image_config: ImageProcessorConfig, limits,
                 folder: Path, name: str) -> None:
        self.network = network
        self.config: ModelConfig = network.config
        self.tokenizer = tokenizer
        self.image_config = image_config
        self.limits = limits
        self.folder = Path(folder)
        self.name = name
        self.num_layers = network.config.num_layers
        self.text_config = network.config.text
        self.backbone = network.backbone

    @classmethod
    def load(cls, folder, device, dtype, *, name: str, options: dict[str, int] | None = None,
             on_progress=None) -> "Phi35Vision":
        """The configs are read and `num_crops` checked against what the checkpoint was built for
        before any weight is read."""
        num_crops = cls.checked_options(options).get("num_crops")
        progress = on_progress or (lambda message: None)
        config = ModelConfig.from_folder(folder)
        image_config = ImageProcessorConfig.from_files(folder, crop_size=config.crop_size, patch_size=config.patch_size)
        limits = model_limits(folder, config, image_config.num_crops)
        if num_crops is not None:
            image_config = replace(image_config, num_crops=num_crops)
            limits.check_crops(num_crops)
        progress(f"loading weights from {folder} ({device}, {str(dtype).removeprefix('torch.')})")
        checkpoint = load_checkpoint(folder, device, dtype)
        progress("loading tokenizer")
        return cls(checkpoint.model, load_tokenizer(folder), image_config, limits, folder, name)

    @classmethod
    def of_network(cls, network: Phi3VForCausalLM, tokenizer, num_crops: int = 1, name: str = "random") -> "Phi35Vision":
        """A network built in memory (tests, benchmarks, the trainer), with the official image
        processing at `num_crops` and the limits of Phi-3.5-V's own checkpoints."""
        config = network.config
        image_config = ImageProcessorConfig(num_crops=num_crops, crop_size=config.crop_size, patch_size=config.patch_size)
        limits = checkpoint_limits(config.text.max_position_embeddings, num_crops)
        return cls(network, tokenizer, image_config, limits, Path("."), name)

    def at_crops(self, num_crops: int) -> "Phi35Vision":
        self.limits.check_crops(num_crops)
        fewer = copy.copy(self)
        fewer.image_config = replace(self.image_config, num_crops=num_crops)
        return fewer

    @property
    def stop_ids(self) -> set[int]:
        ids = {self.config.text.eos_token_id, self.tokenizer.eos_token_id}
        end = self.tokenizer.convert_tokens_to_ids("<|end|>")
        if end is not None and end != self.tokenizer.unk_token_id:
            ids.add(end)
        return {i for i in ids if i is not None}

    # --- images ---

    def read_image(self, source) -> ProcessedImage:
        if isinstance(source, ProcessedImage):
            return source
        picture = load_image(source)
        check_shape(picture, self.image_config, image_name(source))
        return preprocess(picture, self.image_config)

    def image_features(self, images: list[ProcessedImage]) -> list[torch.Tensor]:
        return self.network.image_embeddings(images)

    def image_layout(self, image: ProcessedImage) -> dict:
        return {"h_crops": image.h_crops, "w_crops": image.w_crops, "grid": self.image_config.merged_grid}

    def image_cells(self, picture, layout: dict) -> ImageCells:
        padded, global_view = views_as_seen(picture, self.image_config)
        return image_cells(layout["h_crops"], layout["w_crops"], layout["grid"], padded, global_view)

    # --- prompts ---

    def render(self, turn: UserTurn) -> str:
        """A user turn as Phi-3.5-V's template text: `<|image_k|>` placeholders, labelled or not."""
        if turn.labelled:
            return story_message(turn.text, turn.images, first=turn.first_image)
        if turn.first_image != 1:
            raise ValueError("unlabelled images are the first turn's")
        return user_message(turn.text, turn.images)

    def prompt(self, turn: UserTurn, images: list[ProcessedImage]) -> PromptTokens:
        return build_prompt(self.tokenizer, self.render(turn), images)

    def next_turn(self, history: list[tuple[UserTurn, str]], turn: UserTurn, images: list[ProcessedImage]) -> PromptTokens:
        messages = []
        for past, answer in history:
            messages += [{"role": "user", "content": self.render(past)}, {"role": "assistant", "content": answer}]
        text = next_turn_text(self.tokenizer, messages, self.render(turn))
        return encode_prompt_text(self.tokenizer, text, images, first_image=turn.first_image, opens_chunk=False)

    def embed(self, tokens: PromptTokens, images: list[ProcessedImage], features: list[torch.Tensor] | None = None,
              first_image: int = 1) -> torch.Tensor:
        return self.network.embed(tokens, images, features, first_image=first_image)
