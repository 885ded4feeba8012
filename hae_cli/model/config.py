"""Read the official Phi-3.5-Vision `config.json` into transformers' native config classes.

The official config has `model_type: "phi3_v"` and a remote-code class that does not import
on transformers 5.x, so we split it ourselves: the language model becomes a native
`Phi3Config` (rope "su" -> "longrope"), the vision tower a `CLIPVisionConfig`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import CLIPVisionConfig, Phi3Config

from hae_cli.errors import CheckpointError

SUPPORTED_MODEL_TYPES = ("phi3_v",)

# The official code hard-codes the tower by name; the config only names it.
OFFICIAL_CLIP_NAME = "openai/clip-vit-large-patch14-336"
OFFICIAL_CLIP = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=768,
)

TEXT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "original_max_position_embeddings",
    "rms_norm_eps",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "sliding_window",
    "tie_word_embeddings",
    "attention_dropout",
    "resid_pdrop",
    "embd_pdrop",
    "initializer_range",
)


@dataclass
class ModelConfig:
    """Everything the runtime needs, split into the two native configs plus the image embedding."""

    text: Phi3Config
    vision: CLIPVisionConfig
    image_dim_out: int  # CLIP hidden size; the projection input is 4x this (2x2 merge)
    num_img_tokens: int  # tokens per crop after the merge (144 officially)
    vision_layer_index: int  # which CLIP hidden state feeds the projection (-2 officially)
    raw: dict  # the config.json as read, written back unchanged by the tiny builder

    @property
    def crop_size(self) -> int:
        return self.vision.image_size

    @property
    def patch_size(self) -> int:
        return self.vision.patch_size

    @property
    def num_layers(self) -> int:
        return self.text.num_hidden_layers

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ModelConfig":
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise CheckpointError(f"no config.json in {folder}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"config.json in {folder} is not valid JSON: {exc}") from None
        return cls.from_dict(raw, source=str(folder))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"{source}: model_type {model_type!r} is not supported (expected one of {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        embd = raw.get("embd_layer") or {}
        for key, expected in (("embedding_cls", "image"), ("hd_transform_order", "sub_glb"), ("projection_cls", "mlp")):
            if embd.get(key, expected) != expected:
                raise CheckpointError(f"{source}: embd_layer.{key}={embd.get(key)!r} is not supported (expected {expected!r})")
        img = raw.get("img_processor")
        if not isinstance(img, dict):
            raise CheckpointError(f"{source}: missing img_processor section")
        text = _text_config(raw, source)
        vision = _vision_config(img, source)
        image_dim_out = int(img.get("image_dim_out", vision.hidden_size))
        if image_dim_out != vision.hidden_size:
            raise CheckpointError(f"{source}: img_processor.image_dim_out {image_dim_out} != vision hidden size {vision.hidden_size}")
        grid = vision.image_size // vision.patch_size
        if grid % 2:
            raise CheckpointError(f"{source}: the 2x2 merge needs an even patch grid, got {grid}x{grid}")
        num_img_tokens = int(img.get("num_img_tokens", (grid // 2) ** 2))
        if num_img_tokens != (grid // 2) ** 2:
            raise CheckpointError(f"{source}: num_img_tokens {num_img_tokens} does not match the {grid}x{grid} patch grid")
        return cls(text, vision, image_dim_out, num_img_tokens, int(img.get("layer_idx", -2)), raw)


def _text_config(raw: dict, source: str) -> Phi3Config:
    fields = {key: raw[key] for key in TEXT_FIELDS if key in raw}
    rope = dict(raw.get("rope_scaling") or {})
    rope_type = rope.pop("type", rope.pop("rope_type", "default"))
    parameters = {"rope_type": rope_type, "rope_theta": raw.get("rope_theta", 10000.0)}
    if rope_type in ("su", "longrope"):
        parameters.update(
            rope_type="longrope",
            long_factor=rope["long_factor"],
            short_factor=rope["short_factor"],
            original_max_position_embeddings=raw.get("original_max_position_embeddings", 4096),
        )
        # The ratio sets LongRoPE's attention scale sqrt(1 + ln(factor) / ln(original_max)).
        parameters["factor"] = raw.get("max_position_embeddings", 131072) / parameters["original_max_position_embeddings"]
    elif rope_type != "default":
        raise CheckpointError(f"{source}: rope_scaling type {rope_type!r} is not supported")
    try:
        config = Phi3Config(**fields, rope_parameters=parameters)
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{source}: invalid language-model config: {exc}") from None
    # The official file asks for flash_attention_2; we always use our observing SDPA.
    config._attn_implementation = "hae_sdpa"
    return config


def _vision_config(img: dict, source: str) -> CLIPVisionConfig:
    # `vision_config` is our extension for small checkpoints; the official file only names the tower.
    if "vision_config" in img:
        fields = dict(img["vision_config"])
    elif img.get("model_name") == OFFICIAL_CLIP_NAME:
        fields = dict(OFFICIAL_CLIP)
    else:
        raise CheckpointError(f"{source}: unknown vision tower {img.get('model_name')!r}")
    config = CLIPVisionConfig(**fields)
    config._attn_implementation = "sdpa"
    return config
