"""A Phi-3.5-Vision checkpoint in the official safetensors layout, loaded strictly: every key
present, none left over, every shape as config.json implies."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from hae_cli.checks import finite_weights
from hae_cli.errors import CheckpointError
from hae_cli.model.loading import DEMO_MODEL_DIR, SCENES_MODEL_DIR
from hae_cli.model.phi3v.config import ModelConfig
from hae_cli.model.phi3v.limits import (
    SCENES_MODEL_CROPS, SCENES_MODEL_MAX_IMAGES, ModelLimits, checkpoint_limits, demo_model_limits, shipped_model_limits,
)
from hae_cli.model.phi3v.network import Phi3VForCausalLM, from_official_key

OFFICIAL_MODEL_ID = "microsoft/Phi-3.5-vision-instruct"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def model_limits(folder: Path, config: ModelConfig, file_crops: int) -> ModelLimits:
    """What this checkpoint was built for: a shipped model's own training, else Phi-3.5-V's."""
    if folder.resolve() == DEMO_MODEL_DIR.resolve():
        return demo_model_limits(config.text.original_max_position_embeddings)
    if folder.resolve() == SCENES_MODEL_DIR.resolve():
        return shipped_model_limits("the scenes model", SCENES_MODEL_CROPS, SCENES_MODEL_MAX_IMAGES,
                                    config.text.original_max_position_embeddings)
    return checkpoint_limits(config.text.max_position_embeddings, file_crops)


def weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{folder}: the index names missing weight files: {', '.join(missing)}")
        return files
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    raise CheckpointError(f"no weights in {folder} (expected {SINGLE_FILE} or {INDEX_FILE})")


def read_official_weights(folder: Path, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    for file in weight_files(folder):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as shard:
                read = {key: shard.get_tensor(key).to(device=device, dtype=dtype) for key in shard.keys()}
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(f"cannot read weights from {file}: {exc}") from None
        finite_weights(read, folder, file.name)
        tensors.update(read)
    return tensors


def load_tokenizer(folder: str | Path):
    """The checkpoint's `tokenizer.json` + `tokenizer_config.json` (with the chat template).

    Not AutoTokenizer: the official config.json carries an `auto_map` to remote code, and
    AutoTokenizer would stop to ask whether to trust it.
    """
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        raise CheckpointError(f"no tokenizer.json in {folder}")
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
    except Exception as exc:
        raise CheckpointError(f"cannot load the tokenizer from {folder}: {exc}") from None
    if not tokenizer.chat_template:
        raise CheckpointError(f"the tokenizer in {folder} has no chat template")
    _apply_special_token_flags(tokenizer, folder / "tokenizer_config.json")
    return tokenizer


def _apply_special_token_flags(tokenizer, config_file: Path) -> None:
    """Honour `add_bos_token` / `add_eos_token` as the official files state them: transformers
    5 leaves them to `tokenizer.json`'s post-processor, 4.x (Microsoft's code) applies them."""
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return
    for flag in ("add_bos_token", "add_eos_token"):
        value = config.get(flag)
        if isinstance(value, bool):
            setattr(tokenizer, flag, value)


@dataclass
class LoadedCheckpoint:
    model: Phi3VForCausalLM
    config: ModelConfig
    folder: Path


def load_checkpoint(folder: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedCheckpoint:
    """Build the model without initialising weights, then load every official key strictly."""
    folder = Path(folder)
    device = torch.device(device)
    config = ModelConfig.from_folder(folder)
    official = read_official_weights(folder, dtype, device)
    _check_layer_counts(folder, config, official)
    try:
        with torch.device("meta"):
            model = Phi3VForCausalLM(config)
    except Exception as exc:  # a config the checks in config.py let through but torch cannot build
        message = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"{folder}: config.json describes a model that cannot be built: {message}") from None
    state = {from_official_key(k): v for k, v in official.items()}
    expected = set(model.language_model.state_dict().keys())
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise CheckpointError(_key_mismatch_message(folder, missing, unexpected))
    for key in expected:
        if state[key].shape != model.language_model.state_dict()[key].shape:
            raise CheckpointError(
                f"{folder}: weight {key} has shape {tuple(state[key].shape)}, but config.json implies "
                f"{tuple(model.language_model.state_dict()[key].shape)} (check its sizes: hidden_size, "
                "intermediate_size, vocab_size, the heads, and the same in img_processor.vision_config)"
            )
    model.language_model.load_state_dict(state, strict=True, assign=True)
    _rebuild_buffers(model, device)
    model.eval()
    return LoadedCheckpoint(model, config, folder)


_LAYER_KEYS = {
    "num_hidden_layers": re.compile(r"^model\.layers\.(\d+)\."),
    "img_processor.vision_config.num_hidden_layers": re.compile(r"\.img_processor\.vision_model\.encoder\.layers\.(\d+)\."),
}


def _check_layer_counts(folder: Path, config: ModelConfig, weights: dict) -> None:
    """Layers in the config = layers in the weights, checked before the model is built (a
    config asking for a million layers would otherwise take forever to build)."""
    wanted = {"num_hidden_layers": config.num_layers,
              "img_processor.vision_config.num_hidden_layers": config.vision.num_hidden_layers}
    for field, pattern in _LAYER_KEYS.items():
        found = {int(m.group(1)) for key in weights if (m := pattern.search(key))}
        if found and len(found) != wanted[field]:
            raise CheckpointError(
                f"{folder}: config.json field {field} is {wanted[field]}, but the weights hold {len(found)} layers"
            )


def _key_mismatch_message(folder: Path, missing: list[str], unexpected: list[str]) -> str:
    def sample(keys: list[str]) -> str:
        shown = ", ".join(to_show for to_show in keys[:3])
        return shown + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys: {sample(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys: {sample(unexpected)}")
    return f"{folder} does not match the Phi-3.5-Vision layout: " + "; ".join(parts)


def _rebuild_buffers(model: Phi3VForCausalLM, device: torch.device) -> None:
    """Non-persistent buffers are not in the checkpoint; recompute the ones built on meta."""
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    backbone = model.language_model.model
    with torch.device(device):
        backbone.rotary_emb = Phi3RotaryEmbedding(config=model.config.text)
        embeddings = model.vision.img_processor.embeddings
        embeddings.position_ids = torch.arange(embeddings.num_positions).expand((1, -1))
    leftovers = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftovers:
        raise CheckpointError(f"uninitialised tensors after loading: {', '.join(leftovers[:5])}")
