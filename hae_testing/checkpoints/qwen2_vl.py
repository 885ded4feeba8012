"""Tiny random Qwen2-VL / Qwen2.5-VL checkpoints in the hub layout.

The real weights cannot be downloaded here, so tests load checkpoints written by this module
exactly as they would `Qwen/Qwen2-VL-2B-Instruct` or `Qwen/Qwen2.5-VL-3B-Instruct`: the model's
own config and weights (`save_pretrained`), a byte-level BPE `tokenizer.json` with Qwen's special
tokens in their order, the official chat template (in `chat_template.json` and
`tokenizer_config.json`, as those repos have it) and a `preprocessor_config.json` with the
official fields, only sized so that an image is 4 to 36 tokens. Unlike the 2B/3B repos, the
output head is not tied to the embedding (see `spread_weights`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from hae_testing.checkpoints.hf_tokenizer import (
    CLIP_MEAN,
    CLIP_STD,
    add_tokens,
    qwen2_bpe,
    save_tokenizer_files,
    spread_weights,
    write_json,
)

# chat_template.json of Qwen2-VL-*-Instruct and Qwen2.5-VL-*-Instruct (the same template).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2's added tokens, in their real order (151643, 151644, ...); 2.5 appends tool/FIM tokens.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip
QWEN2_5_PLAIN_TOKENS = [
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]  # fmt: skip

PATCH_SIZE = 14
MERGE_SIZE = 2
# One merged token covers 28 x 28 pixels: images of 4 to 36 tokens.
MIN_PIXELS = 4 * (PATCH_SIZE * MERGE_SIZE) ** 2
MAX_PIXELS = 36 * (PATCH_SIZE * MERGE_SIZE) ** 2

TINY_TEXT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)
# head_dim 16: 8 rotary frequencies split over (t, h, w) as the real [16, 24, 24] splits 64.
MROPE_SECTION = [2, 3, 3]

VARIANTS = {
    "qwen2_vl": dict(
        config_class=Qwen2VLConfig,
        model_class=Qwen2VLForConditionalGeneration,
        processor_class="Qwen2VLProcessor",
        model_max_length=32768,
        max_position_embeddings=32768,
        # hidden_size: the patch merger's output, the decoder's width.
        vision=dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2, hidden_act="quick_gelu",
                    hidden_size=TINY_TEXT["hidden_size"]),
    ),
    "qwen2_5_vl": dict(
        config_class=Qwen2_5_VLConfig,
        model_class=Qwen2_5_VLForConditionalGeneration,
        processor_class="Qwen2_5_VLProcessor",
        model_max_length=131072,
        max_position_embeddings=128000,
        # The last block attends to the whole image, the others within 112-pixel windows, as the
        # real tower's fullatt_block_indexes [7, 15, 23, 31] do.
        vision=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, hidden_act="silu", window_size=112,
            fullatt_block_indexes=[1], tokens_per_second=2, out_hidden_size=TINY_TEXT["hidden_size"],
        ),
    ),
}  # fmt: skip


def qwen_tokenizer_config(chat_template: str, model_max_length: int, **fields) -> dict:
    """`tokenizer_config.json` of the Qwen2 / Qwen3 tokenizer the Qwen-based VLM repos ship (`fields`
    added or replaced)."""
    return {
        "add_prefix_space": False,
        "additional_special_tokens": SPECIAL_TOKENS[1:],
        "bos_token": None,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
        **fields,
    }


def write_tiny_checkpoint(folder: Path, model_type: str, seed: int = 0) -> Path:
    """Write a tiny random `model_type` ("qwen2_vl" or "qwen2_5_vl") checkpoint into `folder`,
    loadable by `AutoModelForImageTextToText` and `AutoProcessor` like the real Instruct repos."""
    variant = VARIANTS[model_type]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    tokenizer = qwen2_bpe()
    add_tokens(tokenizer, SPECIAL_TOKENS)
    if model_type == "qwen2_5_vl":
        add_tokens(tokenizer, QWEN2_5_PLAIN_TOKENS, special=False)
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}

    config = variant["config_class"](
        text_config=dict(
            **TINY_TEXT,
            vocab_size=tokenizer.get_vocab_size(),
            max_position_embeddings=variant["max_position_embeddings"],
            rms_norm_eps=1e-6,
            max_window_layers=TINY_TEXT["num_hidden_layers"],
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": MROPE_SECTION},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            tie_word_embeddings=False,
        ),
        vision_config=dict(
            **variant["vision"],
            patch_size=PATCH_SIZE,
            spatial_merge_size=MERGE_SIZE,
            temporal_patch_size=2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        architectures=[variant["model_class"].__name__],
    )
    torch.manual_seed(seed)
    model = variant["model_class"](config)
    spread_weights(model, seed, never_generated=[ids["<|image_pad|>"], ids["<|video_pad|>"]])
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        do_sample=True,
        temperature=0.01,
        top_k=1,
        top_p=0.001,
        repetition_penalty=1.0,
    )
    model.save_pretrained(folder)

    save_tokenizer_files(
        folder,
        tokenizer,
        qwen_tokenizer_config(CHAT_TEMPLATE, variant["model_max_length"]),
        vocab_files=True,
    )
    write_json(folder, "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    write_json(
        folder,
        "preprocessor_config.json",
        {
            "min_pixels": MIN_PIXELS,
            "max_pixels": MAX_PIXELS,
            "patch_size": PATCH_SIZE,
            "temporal_patch_size": 2,
            "merge_size": MERGE_SIZE,
            "image_mean": CLIP_MEAN,
            "image_std": CLIP_STD,
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": variant["processor_class"],
        },
    )
    return folder
