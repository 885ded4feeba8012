"""Tiny random Qwen3-VL checkpoints in the layout of `Qwen/Qwen3-VL-2B-Instruct` (and of
`Qwen/Qwen3-VL-30B-A3B-Instruct`, whose text layers are mixtures of experts).

The real weights cannot be downloaded here, so tests load checkpoints written by this module
exactly as they would Qwen3-VL-*-Instruct: the model's own config and weights (`save_pretrained`:
a vision tower whose early blocks feed deepstack features into the first text layers, a Qwen3
text model with interleaved multimodal rotary positions), Qwen's byte-level BPE with Qwen3's
added tokens in their order, a chat template that renders what the real one renders for text and
images (its tool-call and reasoning branches left out), and a `preprocessor_config.json` with the
official fields, only sized so that an image is 4 to 16 tokens. Unlike the 2B repo, the output
head is not tied to the embedding (see `spread_weights`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)

from hae_testing.checkpoints.qwen2_vl import QWEN2_5_PLAIN_TOKENS, SPECIAL_TOKENS, qwen_tokenizer_config
from hae_testing.checkpoints.hf_tokenizer import add_tokens, qwen2_bpe, save_tokenizer_files, spread_weights, write_json

# What Qwen3-VL-*-Instruct's chat_template renders without tools: no default system turn.
CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' -%}{%- if messages[0].content is string -%}"
    "{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}"
    "{%- else -%}{%- for content in messages[0].content -%}{%- if 'text' in content -%}"
    "{{- '<|im_start|>system\n' + content.text + '<|im_end|>\n' }}{%- endif -%}{%- endfor -%}{%- endif -%}{%- endif -%}"
    "{%- set image_count = namespace(value=0) -%}{%- set video_count = namespace(value=0) -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'user' or message.role == 'assistant' -%}"
    "{{- '<|im_start|>' + message.role + '\n' }}"
    "{%- if message.content is string -%}{{- message.content }}{%- else -%}{%- for content in message.content -%}"
    "{%- if content.type == 'image' or 'image' in content or 'image_url' in content -%}"
    "{%- set image_count.value = image_count.value + 1 -%}"
    "{%- if add_vision_id -%}Picture {{ image_count.value }}: {% endif -%}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif content.type == 'video' or 'video' in content -%}"
    "{%- set video_count.value = video_count.value + 1 -%}"
    "{%- if add_vision_id -%}Video {{ video_count.value }}: {% endif -%}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in content -%}{{- content.text }}{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\n' }}{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' }}{%- endif -%}"
)
QWEN3_PLAIN_TOKENS = ["<tool_response>", "</tool_response>", "<think>", "</think>"]
PATCH_SIZE = 16
MERGE_SIZE = 2
# One merged token covers 32 x 32 pixels: images of 4 to 16 tokens.
MIN_PIXELS = 4 * (PATCH_SIZE * MERGE_SIZE) ** 2
MAX_PIXELS = 16 * (PATCH_SIZE * MERGE_SIZE) ** 2
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16)
# Deepstack from vision blocks 0 and 1 into text layers 0 and 1 ([8, 16, 24] into 0-2 on the real 2B).
# Qwen3-VL-30B-A3B's text model: every layer a mixture of experts (128 experts, 8 a token on the real one).
TINY_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
VARIANTS = {
    "qwen3_vl": (Qwen3VLConfig, Qwen3VLForConditionalGeneration, {}),
    "qwen3_vl_moe": (Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration, TINY_MOE),
}
TINY_VISION = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, num_position_embeddings=16,
                   deepstack_visual_indexes=[0, 1])


def write_tiny_checkpoint(folder: Path, model_type: str = "qwen3_vl", seed: int = 0) -> Path:
    """Write a tiny random `model_type` ("qwen3_vl", or "qwen3_vl_moe": Qwen3-VL-30B-A3B's layout)
    Instruct-style checkpoint into `folder`, loadable by `AutoModelForImageTextToText` and
    `AutoProcessor` like the real repos."""
    if model_type not in VARIANTS:
        raise ValueError(f"no tiny {model_type} checkpoint here")
    config_class, model_class, text_extra = VARIANTS[model_type]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = qwen2_bpe()
    add_tokens(tokenizer, SPECIAL_TOKENS)
    add_tokens(tokenizer, QWEN2_5_PLAIN_TOKENS + QWEN3_PLAIN_TOKENS, special=False)
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}

    config = config_class(
        text_config=dict(
            **TINY_TEXT, **text_extra, vocab_size=tokenizer.get_vocab_size(), max_position_embeddings=262144, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [2, 3, 3],
                             "mrope_interleaved": True},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], tie_word_embeddings=False,
        ),
        vision_config=dict(**TINY_VISION, hidden_act="gelu_pytorch_tanh", in_channels=3, patch_size=PATCH_SIZE,
                           spatial_merge_size=MERGE_SIZE, temporal_patch_size=2, out_hidden_size=TINY_TEXT["hidden_size"]),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        architectures=[model_class.__name__],
    )
    torch.manual_seed(seed)
    model = model_class(config)
    spread_weights(model, seed, never_generated=[ids["<|image_pad|>"], ids["<|video_pad|>"]])
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], do_sample=True, temperature=0.7, top_k=20, top_p=0.8,
    )
    model.save_pretrained(folder)

    save_tokenizer_files(folder, tokenizer, qwen_tokenizer_config(CHAT_TEMPLATE, 262144), vocab_files=True)
    write_json(folder, "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    write_json(folder, "preprocessor_config.json", {
        "size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}, "patch_size": PATCH_SIZE,
        "temporal_patch_size": 2, "merge_size": MERGE_SIZE, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen3VLProcessor",
    })
    return folder
