"""Read the official Phi-3.5-Vision `config.json` into transformers' native config classes.

The official config has `model_type: "phi3_v"` and a remote-code class that does not import
on transformers 5.x, so we split it ourselves: the language model becomes a native
`Phi3Config` (rope "su" -> "longrope"), the vision tower a `CLIPVisionConfig`.
"""

from __future__ import annotations

import math
import re
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


# What each field the runtime reads may hold: (kind, low, high); kinds are "int", "number",
# "bool", "act" (an activation transformers knows), "id" (a token id or None).
_SIZE = ("int", 1, None)
_RATE = ("number", 0.0, 1.0)
TEXT_SPEC = {
    "vocab_size": _SIZE, "hidden_size": _SIZE, "intermediate_size": _SIZE, "num_hidden_layers": _SIZE,
    "num_attention_heads": _SIZE, "num_key_value_heads": _SIZE, "max_position_embeddings": _SIZE,
    "original_max_position_embeddings": _SIZE, "sliding_window": ("int?", 1, None),
    "rms_norm_eps": ("number", 1e-30, 1.0), "rope_theta": ("number", 1e-30, None),
    "attention_dropout": _RATE, "resid_pdrop": _RATE, "embd_pdrop": _RATE,
    "initializer_range": ("number", 0.0, None), "tie_word_embeddings": ("bool", None, None),
    "hidden_act": ("act", None, None), "bos_token_id": ("id", 0, None), "eos_token_id": ("id", 0, None),
    "pad_token_id": ("id", 0, None),
}
VISION_SPEC = {
    "hidden_size": _SIZE, "intermediate_size": _SIZE, "num_hidden_layers": _SIZE, "num_attention_heads": _SIZE,
    "image_size": _SIZE, "patch_size": _SIZE, "projection_dim": _SIZE, "num_channels": _SIZE,
    "layer_norm_eps": ("number", 1e-30, 1.0), "attention_dropout": _RATE, "hidden_act": ("act", None, None),
}
IMAGE_SPEC = {"image_dim_out": _SIZE, "num_img_tokens": _SIZE, "layer_idx": ("int", None, None)}


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
        from hae_cli.model.loading import read_config

        return cls.from_dict(read_config(Path(folder)), source=str(folder))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"{source}: model_type {model_type!r} is not supported (expected one of {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        embd = raw.get("embd_layer") or {}
        if not isinstance(embd, dict):
            raise CheckpointError(f"{source}: config.json field embd_layer must be an object")
        for key, expected in (("embedding_cls", "image"), ("hd_transform_order", "sub_glb"), ("projection_cls", "mlp")):
            if embd.get(key, expected) != expected:
                raise CheckpointError(f"{source}: embd_layer.{key}={embd.get(key)!r} is not supported (expected {expected!r})")
        img = raw.get("img_processor")
        if not isinstance(img, dict):
            raise CheckpointError(f"{source}: missing img_processor section")
        _check_fields(raw, TEXT_SPEC, "", source)
        _check_fields(img, IMAGE_SPEC, "img_processor.", source)
        text = _text_config(raw, source)
        vision = _vision_config(img, source)
        image_dim_out = int(img.get("image_dim_out", vision.hidden_size))
        if image_dim_out != vision.hidden_size:
            raise CheckpointError(f"{source}: config.json field img_processor.image_dim_out {image_dim_out} is not "
                                  f"the vision tower's hidden_size {vision.hidden_size}")
        grid = vision.image_size // vision.patch_size
        if grid % 2:
            raise CheckpointError(f"{source}: config.json fields image_size / patch_size give a {grid}x{grid} patch grid; "
                                  "the 2x2 merge needs an even one")
        num_img_tokens = int(img.get("num_img_tokens", (grid // 2) ** 2))
        if num_img_tokens != (grid // 2) ** 2:
            raise CheckpointError(f"{source}: config.json field img_processor.num_img_tokens {num_img_tokens} does not "
                                  f"match the {grid}x{grid} patch grid of image_size / patch_size ({(grid // 2) ** 2})")
        layer_idx = int(img.get("layer_idx", -2))
        layers = vision.num_hidden_layers
        if not -layers <= layer_idx < layers:
            raise CheckpointError(
                f"{source}: img_processor.layer_idx {layer_idx} names no layer of the {layers}-layer vision tower "
                f"(use {-layers}..{layers - 1})"
            )
        return cls(text, vision, image_dim_out, num_img_tokens, layer_idx, raw)


def _check_fields(section: dict, spec: dict, prefix: str, source: str) -> None:
    """Each field present in `section` has the kind and range `spec` gives it."""
    from transformers.activations import ACT2FN

    for name, (kind, low, high) in spec.items():
        if name not in section:
            continue
        value, field = section[name], f"{prefix}{name}"
        if kind == "act":
            if not isinstance(value, str) or value not in ACT2FN:
                raise CheckpointError(f"{source}: config.json field {field} is {value!r}, not an activation "
                                      f"transformers knows (such as silu, gelu, quick_gelu)")
            continue
        if kind == "bool":
            if not isinstance(value, bool):
                raise CheckpointError(f"{source}: config.json field {field} must be true or false, got {value!r}")
            continue
        if kind in ("int?", "id") and value is None:
            continue
        if kind == "id" and isinstance(value, list) and value:  # eos_token_id may list several
            for item in value:
                _check_value(item, "int", low, high, field, source)
            continue
        _check_value(value, "number" if kind == "number" else "int", low, high, field, source)


def _check_value(value, kind: str, low, high, field: str, source: str) -> None:
    whole = isinstance(value, int) and not isinstance(value, bool)
    number = whole or (isinstance(value, float) and math.isfinite(value))
    if not (whole if kind == "int" else number):
        wanted = "a whole number" if kind == "int" else "a finite number"
        raise CheckpointError(f"{source}: config.json field {field} must be {wanted}, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise CheckpointError(f"{source}: config.json field {field} must be {allowed}, got {value!r}")


def _check_text_shapes(raw: dict, source: str) -> int:
    """The relations between sizes that the attention and the token ids need; returns the head size."""
    hidden, heads = raw.get("hidden_size", 3072), raw.get("num_attention_heads", 32)
    kv_heads = raw.get("num_key_value_heads") or heads
    if hidden % heads:
        raise CheckpointError(f"{source}: config.json field hidden_size {hidden} is not a multiple of "
                              f"num_attention_heads {heads}")
    if heads % kv_heads:
        raise CheckpointError(f"{source}: config.json field num_attention_heads {heads} is not a multiple of "
                              f"num_key_value_heads {kv_heads}")
    head_dim = hidden // heads
    if head_dim % 2:
        raise CheckpointError(f"{source}: config.json fields hidden_size / num_attention_heads give an odd head "
                              f"size {head_dim}; rotary embeddings need an even one")
    vocab = raw.get("vocab_size", 32064)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        ids = raw.get(name)
        for token in ids if isinstance(ids, list) else [ids]:
            if token is not None and token >= vocab:
                raise CheckpointError(f"{source}: config.json field {name} {token} is not below vocab_size {vocab}")
    return head_dim


def _check_rope_factors(rope: dict, head_dim: int, raw: dict, source: str) -> None:
    """LongRoPE scales each of the head's head_dim / 2 rotary frequencies by its own factor."""
    hidden, heads = raw.get("hidden_size", 3072), raw.get("num_attention_heads", 32)
    for name in ("long_factor", "short_factor"):
        factors = rope.get(name)
        if not isinstance(factors, list) or not all(
            isinstance(f, (int, float)) and not isinstance(f, bool) and math.isfinite(f) and f > 0 for f in factors
        ):
            raise CheckpointError(f"{source}: config.json field rope_scaling.{name} must be a list of positive numbers")
        if len(factors) != head_dim // 2:
            raise CheckpointError(
                f"{source}: config.json field rope_scaling.{name} has {len(factors)} values, but hidden_size {hidden} "
                f"/ num_attention_heads {heads} = head size {head_dim} needs {head_dim // 2}"
            )
    original, longest = raw.get("original_max_position_embeddings", 4096), raw.get("max_position_embeddings", 131072)
    if original > longest:
        raise CheckpointError(f"{source}: config.json field original_max_position_embeddings {original} is above "
                              f"max_position_embeddings {longest}")


def _native(cls, fields: dict, prefix: str, source: str):
    """Build a transformers config; whatever its own validation rejects (the checks above cover
    what we know of) becomes one line naming the field when transformers names it."""
    try:
        return cls(**fields)
    except Exception as exc:  # transformers raises strict-dataclass, Key, Value and Type errors
        message = " ".join(str(exc).split())
        named = re.search(r"field '(\w+)'|`(\w+)`", message)
        field = f" field {prefix}{named.group(1) or named.group(2)}" if named else ""
        raise CheckpointError(f"{source}: config.json{field} is not accepted by transformers: {message[:300]}") from None


def _text_config(raw: dict, source: str) -> Phi3Config:
    fields = {key: raw[key] for key in TEXT_FIELDS if key in raw}
    rope = raw.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise CheckpointError(f"{source}: config.json field rope_scaling must be an object, got {rope!r}")
    rope = dict(rope)
    rope_type = rope.pop("type", rope.pop("rope_type", "default"))
    parameters = {"rope_type": rope_type, "rope_theta": raw.get("rope_theta", 10000.0)}
    head_dim = _check_text_shapes(raw, source)
    if rope_type in ("su", "longrope"):
        _check_rope_factors(rope, head_dim, raw, source)
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
    config = _native(Phi3Config, dict(fields, rope_parameters=parameters), "", source)
    # The official file asks for flash_attention_2; we always use our observing SDPA.
    config._attn_implementation = "hae_sdpa"
    return config


def _vision_config(img: dict, source: str) -> CLIPVisionConfig:
    # `vision_config` is our extension for small checkpoints; the official file only names the tower.
    if "vision_config" in img:
        if not isinstance(img["vision_config"], dict):
            raise CheckpointError(f"{source}: config.json field img_processor.vision_config must be an object")
        fields = dict(img["vision_config"])
    elif img.get("model_name") == OFFICIAL_CLIP_NAME:
        fields = dict(OFFICIAL_CLIP)
    else:
        raise CheckpointError(f"{source}: unknown vision tower {img.get('model_name')!r}")
    prefix = "img_processor.vision_config."
    _check_fields(fields, VISION_SPEC, prefix, source)
    hidden, heads = fields.get("hidden_size", 768), fields.get("num_attention_heads", 12)
    if hidden % heads:
        raise CheckpointError(f"{source}: config.json field {prefix}hidden_size {hidden} is not a multiple of "
                              f"{prefix}num_attention_heads {heads}")
    size, patch = fields.get("image_size", 224), fields.get("patch_size", 32)
    if size % patch:
        raise CheckpointError(f"{source}: config.json field {prefix}image_size {size} is not a multiple of "
                              f"{prefix}patch_size {patch}")
    config = _native(CLIPVisionConfig, fields, prefix, source)
    config._attn_implementation = "sdpa"
    return config
