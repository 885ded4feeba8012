"""Tiny random InternVL checkpoints in the layout of transformers' native `internvl` repos.

The real weights cannot be downloaded here, so tests load checkpoints written by this module
exactly as they would `OpenGVLab/InternVL3-1B-hf`: the model's own config and weights
(`save_pretrained`, a Qwen2 text model), Qwen2.5's tokenizer with InternVL's `<img>`, `</img>`,
`<IMG_CONTEXT>` ... added and named as the processor reads them (`extra_special_tokens`), the
chat template of transformers' conversion script, `processor_config.json` and a
`preprocessor_config.json` with the official fields (GotOcr2's tiling), only with 112-pixel tiles
of 16 tokens and at most 6 tiles. Unlike InternVL3-1B, the output head is not tied to the
embedding (see `spread_weights`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GenerationConfig, InternVLConfig, InternVLForConditionalGeneration

from hae_testing.checkpoints.qwen2_vl import QWEN2_5_PLAIN_TOKENS, SPECIAL_TOKENS, qwen_tokenizer_config
from hae_testing.checkpoints.hf_tokenizer import add_tokens, qwen2_bpe, save_tokenizer_files, spread_weights, write_json

# The chat template transformers' `convert_internvl_weights_to_hf.py` writes (no default system turn).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)
# InternVL's tokens after Qwen2.5's (151665 on), then the video token the processor names.
INTERNVL_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
NAMED_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                "video_token": "<video>"}
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
TILE = 112  # pixels (448 on the real model)
PATCH_SIZE = 14
DOWNSAMPLE = 0.5  # pixel shuffle: (112 / 14 * 0.5)^2 = 16 tokens a tile (256 on the real model)
MAX_TILES = 6  # the processor's max_patches (12 on the real model)

TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def image_seq_length() -> int:
    return int((TILE // PATCH_SIZE * DOWNSAMPLE) ** 2)


def write_tiny_checkpoint(folder: Path, model_type: str = "internvl", seed: int = 0) -> Path:
    """Write a tiny random InternVL3-style checkpoint into `folder`, loadable by
    `AutoModelForImageTextToText` and `AutoProcessor` like the real `-hf` repos."""
    if model_type != "internvl":
        raise ValueError(f"no tiny {model_type} checkpoint here")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = qwen2_bpe()
    add_tokens(tokenizer, SPECIAL_TOKENS)
    add_tokens(tokenizer, QWEN2_5_PLAIN_TOKENS, special=False)
    add_tokens(tokenizer, INTERNVL_TOKENS + ["<video>"])
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS + INTERNVL_TOKENS}

    config = InternVLConfig(
        text_config=dict(
            model_type="qwen2", **TINY_TEXT, vocab_size=tokenizer.get_vocab_size(), max_position_embeddings=32768,
            rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], tie_word_embeddings=False,
            use_cache=True,
        ),
        vision_config=dict(
            **TINY_VISION, image_size=[TILE, TILE], patch_size=[PATCH_SIZE, PATCH_SIZE], use_qk_norm=False,
            attention_bias=True, norm_type="layer_norm", layer_scale_init_value=0.1, use_mean_pooling=True,
            use_absolute_position_embeddings=True,
        ),
        image_token_id=ids["<IMG_CONTEXT>"],
        image_seq_length=image_seq_length(),
        downsample_ratio=DOWNSAMPLE,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
        architectures=["InternVLForConditionalGeneration"],
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    spread_weights(model, seed, never_generated=[ids[token] for token in INTERNVL_TOKENS[:3]])
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]
    )
    model.save_pretrained(folder)

    config_fields = {"additional_special_tokens": SPECIAL_TOKENS[1:] + INTERNVL_TOKENS, "extra_special_tokens":
                     NAMED_TOKENS, "return_token_type_ids": False}
    save_tokenizer_files(folder, tokenizer, qwen_tokenizer_config(CHAT_TEMPLATE, 8192, **config_fields),
                         vocab_files=True)
    write_json(folder, "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    write_json(folder, "processor_config.json", {"image_seq_length": image_seq_length(),
                                                 "processor_class": "InternVLProcessor"})
    write_json(
        folder,
        "preprocessor_config.json",
        {
            "crop_size": None, "crop_to_patches": False, "data_format": "channels_first", "default_to_square": True,
            "do_center_crop": None, "do_convert_rgb": True, "do_normalize": True, "do_rescale": True,
            "do_resize": True, "image_mean": IMAGENET_MEAN, "image_processor_type": "GotOcr2ImageProcessor",
            "image_std": IMAGENET_STD, "max_patches": MAX_TILES, "min_patches": 1, "processor_class":
            "InternVLProcessor", "resample": 3, "rescale_factor": 1 / 255, "size": {"height": TILE, "width": TILE},
        },
    )
    return folder
