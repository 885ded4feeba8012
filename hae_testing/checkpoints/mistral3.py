"""Tiny random Mistral 3 checkpoints in the layout of `mistralai/Mistral-Small-3.1-24B-Instruct-2503`.

The real weights cannot be downloaded here, so tests load checkpoints written by this module
exactly as they would the transformers files of Mistral-Small-3.1: the model's own config and
weights (`save_pretrained`: a Pixtral vision tower, the patch merger, a Mistral text model), a
Tekken-style `tokenizer.json` with Mistral's control tokens at their ids (`[IMG]` 10, `[IMG_BREAK]`
12, `[IMG_END]` 13), a chat template of the real one's shape (`<s>`, a default system prompt
that carries today's date, `[INST]` ... `[/INST]`, an answer closed by `</s>`; the system text
shortened), and `processor_config.json` / `preprocessor_config.json` with the official fields,
only with images of at most 112 pixels a side (4 x 4 merged patches). Unlike the real model, the
output head is not tied to the embedding (see `spread_weights`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GenerationConfig, Mistral3Config, Mistral3ForConditionalGeneration

from hae_testing.checkpoints.hf_tokenizer import (
    CLIP_MEAN,
    CLIP_STD,
    save_tokenizer_files,
    spread_weights,
    tekken_bpe,
    write_json,
)

# Mistral's first control tokens, in their real order (ids 0-19).
CONTROL_TOKENS = [
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
    "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]",
]  # fmt: skip
CHAT_TEMPLATE = (
    "{%- set today = strftime_now(\"%Y-%m-%d\") %}"
    "{%- set default_system_message = \"You are Mistral Small 3.1, a Large Language Model (LLM) created by "
    "Mistral AI.\\nThe current date is \" + today + \".\" %}"
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- if messages[0]['content'] is string %}{%- set system_message = messages[0]['content'] %}"
    "{%- else %}{%- set system_message = messages[0]['content'][0]['text'] %}{%- endif %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system_message = default_system_message %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if message['content'] is string %}{{- '[INST]' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST]' }}{%- for block in message['content'] %}"
    "{%- if block['type'] == 'text' %}{{- block['text'] }}"
    "{%- elif block['type'] in ['image', 'image_url'] %}{{- '[IMG]' }}"
    "{%- else %}{{- raise_exception('Only text and image blocks are supported in message content!') }}{%- endif %}"
    "{%- endfor %}{{- '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'system' %}"
    "{%- if message['content'] is string %}{{- '[SYSTEM_PROMPT]' + message['content'] + '[/SYSTEM_PROMPT]' }}"
    "{%- else %}{{- '[SYSTEM_PROMPT]' + message['content'][0]['text'] + '[/SYSTEM_PROMPT]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- if message['content'] is string %}{{- message['content'] + eos_token }}"
    "{%- else %}{{- message['content'][0]['text'] + eos_token }}{%- endif %}"
    "{%- else %}{{- raise_exception('Only user, system and assistant roles are supported!') }}{%- endif %}"
    "{%- endfor %}"
)
PATCH_SIZE = 14
MERGE_SIZE = 2
LONGEST_EDGE = 112  # pixels (1540 on the real model)

TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, head_dim=16)


def write_tiny_checkpoint(folder: Path, model_type: str = "mistral3", seed: int = 0) -> Path:
    """Write a tiny random Mistral-Small-3.1-style checkpoint into `folder`, loadable by
    `AutoModelForImageTextToText` and `AutoProcessor` like the real repo."""
    if model_type != "mistral3":
        raise ValueError(f"no tiny {model_type} checkpoint here")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tekken_bpe(CONTROL_TOKENS)
    ids = {token: tokenizer.token_to_id(token) for token in CONTROL_TOKENS}
    assert ids["[IMG]"] == 10 and ids["[IMG_END]"] == 13

    config = Mistral3Config(
        text_config=dict(
            model_type="mistral", **TINY_TEXT, vocab_size=tokenizer.get_vocab_size(), max_position_embeddings=131072,
            rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 1000000000.0},
            sliding_window=None, hidden_act="silu", bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        ),
        vision_config=dict(
            model_type="pixtral", **TINY_VISION, image_size=LONGEST_EDGE, patch_size=PATCH_SIZE, num_channels=3,
            hidden_act="silu", rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        image_token_index=ids["[IMG]"],
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        multimodal_projector_bias=False,
        spatial_merge_size=MERGE_SIZE,
        tie_word_embeddings=False,
        architectures=["Mistral3ForConditionalGeneration"],
    )
    torch.manual_seed(seed)
    model = Mistral3ForConditionalGeneration(config)
    spread_weights(model, seed, never_generated=[ids[token] for token in ("[IMG]", "[IMG_BREAK]", "[IMG_END]")])
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=11)
    model.save_pretrained(folder)

    save_tokenizer_files(
        folder,
        tokenizer,
        {
            "add_bos_token": False,
            "add_eos_token": False,
            "bos_token": "<s>",
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": "</s>",
            "legacy": True,
            "model_max_length": 131072,
            "pad_token": "<pad>",
            "processor_class": "PixtralProcessor",
            "tokenizer_class": "LlamaTokenizer",
            "unk_token": "<unk>",
        },
    )
    write_json(folder, "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    write_json(folder, "processor_config.json", {
        "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]", "image_token": "[IMG]",
        "patch_size": PATCH_SIZE, "processor_class": "PixtralProcessor", "spatial_merge_size": MERGE_SIZE,
    })
    write_json(folder, "preprocessor_config.json", {
        "crop_size": None, "data_format": "channels_first", "default_to_square": True, "device": None,
        "do_center_crop": None, "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": CLIP_MEAN, "image_processor_type": "PixtralImageProcessor", "image_std": CLIP_STD,
        "patch_size": PATCH_SIZE, "processor_class": "PixtralProcessor", "resample": 3, "rescale_factor": 1 / 255,
        "size": {"longest_edge": LONGEST_EDGE},
    })
    return folder
