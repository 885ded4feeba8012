"""Write checkpoints in the exact official Phi-3.5-Vision layout, at any size.

Phi-3.5-V's weights cannot be downloaded here, so tests and the demo model use small
checkpoints written by this module and loaded by exactly the same code path as the
official one: `config.json` with every official field, sharded safetensors with the
official key names and an index, tokenizer files with the chat tokens, and
`preprocessor_config.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hae_cli.model.phi3v.checkpoint import INDEX_FILE
from hae_cli.model.phi3v.config import ModelConfig
from hae_cli.model.phi3v.network import Phi3VForCausalLM

IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]

TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
# 336 / 14 = 24 patches a side, as in the official tower, so every crop gives 144 tokens.
TINY_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=336,
    patch_size=14,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=32,
)
DEFAULT_WORDS = (
    "what is the color of shape a an image does this contain circle rectangle triangle red green blue "
    "yellow black gray teal brown purple yes no not there in picture tell me about story describe"
).split()


def official_config(vocab_size: int, bos: int, eos: int, pad: int, text: dict, vision: dict) -> dict:
    """A config.json with every field of the official one; `img_processor.vision_config` is our
    extension that names a tower other than CLIP-L/14-336."""
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    half = head_dim // 2
    return {
        "_name_or_path": "Phi-3.5-vision-instruct",
        "architectures": ["Phi3VForCausalLM"],
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_phi3_v.Phi3VConfig",
            "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM",
        },
        "bos_token_id": bos,
        "embd_layer": {
            "embedding_cls": "image",
            "hd_transform_order": "sub_glb",
            "projection_cls": "mlp",
            "use_hd_transform": True,
            "with_learnable_separator": True,
        },
        "embd_pdrop": 0.0,
        "eos_token_id": eos,
        "hidden_act": "silu",
        "hidden_size": text["hidden_size"],
        "img_processor": {
            "image_dim_out": vision["hidden_size"],
            "model_name": "openai/clip-vit-large-patch14-336",
            "name": "clip_vision_model",
            "num_img_tokens": (vision["image_size"] // vision["patch_size"] // 2) ** 2,
            "vision_config": dict(vision),
        },
        "initializer_range": 0.02,
        "intermediate_size": text["intermediate_size"],
        "max_position_embeddings": 131072,
        "model_type": "phi3_v",
        "num_attention_heads": text["num_attention_heads"],
        "num_hidden_layers": text["num_hidden_layers"],
        "num_key_value_heads": text["num_key_value_heads"],
        "original_max_position_embeddings": 4096,
        "pad_token_id": pad,
        "resid_pdrop": 0.0,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "long_factor": [1.0 + 0.25 * i for i in range(half)],
            "short_factor": [1.0 + 0.01 * i for i in range(half)],
            "type": "su",
        },
        "rope_theta": text.get("rope_theta", 10000.0),
        "sliding_window": 262144,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.38.1",
        "use_cache": True,
        "vocab_size": vocab_size,
        "_attn_implementation": "flash_attention_2",
    }


def preprocessor_config(num_crops: int) -> dict:
    """Phi-3.5-V's `preprocessor_config.json`: its image processor lives in
    `processing_phi3_v.py` (Phi-3-vision had a separate `image_processing_phi3_v.py`)."""
    return {
        "auto_map": {
            "AutoImageProcessor": "processing_phi3_v.Phi3VImageProcessor",
            "AutoProcessor": "processing_phi3_v.Phi3VProcessor",
        },
        "do_convert_rgb": True,
        "image_mean": IMAGE_MEAN,
        "image_processor_type": "Phi3VImageProcessor",
        "image_std": IMAGE_STD,
        "num_crops": num_crops,
        "num_img_tokens": 144,
        "processor_class": "Phi3VProcessor",
    }


PROCESSOR_CONFIG = {"auto_map": {"AutoProcessor": "processing_phi3_v.Phi3VProcessor"}, "processor_class": "Phi3VProcessor"}


def official_tokenizer_config(tokenizer) -> dict:
    """`tokenizer_config.json` in the shape of the official Phi-3.5-V file, which transformers
    4.4x's `AutoTokenizer` (and the official `Phi3VProcessor`, whose tokenizer class is
    `LlamaTokenizer(Fast)`) reads from `tokenizer.json` and this: the Llama class,
    `add_bos_token`, every added token with its flags, and the chat template inline (4.4x
    knows no separate `chat_template.jinja`)."""
    from hae_testing.checkpoints.hf_tokenizer import added_tokens_entries

    added = added_tokens_entries(tokenizer.added_tokens_decoder)
    return {
        "add_bos_token": bool(tokenizer.add_bos_token),
        "add_eos_token": bool(tokenizer.add_eos_token),
        "added_tokens_decoder": added,
        "bos_token": tokenizer.bos_token,
        "chat_template": tokenizer.chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": tokenizer.eos_token,
        "legacy": False,
        "model_max_length": 131072,
        "pad_token": tokenizer.pad_token,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": tokenizer.unk_token,
        "use_default_system_prompt": False,
    }


def save_tokenizer(tokenizer, folder: Path) -> None:
    """The official tokenizer files: `tokenizer.json`, `tokenizer_config.json`,
    `special_tokens_map.json` (not transformers 5's own `save_pretrained` form)."""
    tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))
    config = official_tokenizer_config(tokenizer)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {name: config[name] for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (folder / "chat_template.jinja").unlink(missing_ok=True)  # a stale transformers-5 copy would win


def save_checkpoint(model: Phi3VForCausalLM, tokenizer, folder: str | Path, num_crops: int, shards: int = 2) -> Path:
    """Write `model` (and its tokenizer) in the official layout; the inverse of `load_checkpoint`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model.config.raw, indent=2))
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(num_crops), indent=2))
    (folder / "processor_config.json").write_text(json.dumps(PROCESSOR_CONFIG, indent=2))
    save_tokenizer(tokenizer, folder)
    state = {k: v.detach().contiguous().cpu() for k, v in model.official_state_dict().items()}
    groups = _split_evenly(sorted(state), state, shards)
    weight_map, total = {}, 0
    for number, keys in enumerate(groups, start=1):
        name = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: state[k] for k in keys}, str(folder / name), metadata={"format": "pt"})
        for key in keys:
            weight_map[key] = name
            total += state[key].numel() * state[key].element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return folder


def _split_evenly(keys: list[str], state: dict, shards: int) -> list[list[str]]:
    total = sum(state[k].numel() for k in keys)
    groups: list[list[str]] = [[]]
    running = 0
    for key in keys:
        if running >= total * len(groups) / shards and len(groups) < shards:
            groups.append([])
        groups[-1].append(key)
        running += state[key].numel()
    return [g for g in groups if g]


def build_model(
    tokenizer,
    text: dict | None = None,
    vision: dict | None = None,
    seed: int = 0,
    vocab_size: int | None = None,
    device: str | torch.device = "cpu",
) -> Phi3VForCausalLM:
    """A randomly initialised model whose config is a full official config.json, built on `device`
    (`vocab_size`: embedding rows, at least the tokenizer's; Phi-3.5-V has 32064)."""
    text = {**TINY_TEXT, **(text or {})}
    vision = {**TINY_VISION, **(vision or {})}
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    raw = official_config(
        vocab_size=max(vocab_size or 0, len(tokenizer)),
        bos=tokenizer.bos_token_id,
        eos=tokenizer.eos_token_id,
        pad=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_id,
        text=text,
        vision=vision,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = Phi3VForCausalLM(ModelConfig.from_dict(raw))
    with torch.no_grad():
        # Random separators, so that tests can tell them from zero padding.
        model.vision.glb_GN.normal_(std=0.02)
        model.vision.sub_GN.normal_(std=0.02)
    return model.eval()


def write_tiny_checkpoint(
    folder: str | Path,
    *,
    seed: int = 0,
    num_crops: int = 1,
    shards: int = 2,
    text: dict | None = None,
    vision: dict | None = None,
    words: tuple[str, ...] | list[str] = DEFAULT_WORDS,
) -> Path:
    from hae_testing.checkpoints.phi3v_tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(list(words))
    model = build_model(tokenizer, text=text, vision=vision, seed=seed)
    return save_checkpoint(model, tokenizer, folder, num_crops=num_crops, shards=shards)
