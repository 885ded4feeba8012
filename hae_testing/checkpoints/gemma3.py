"""Tiny random Gemma 3 checkpoints in the layout of `google/gemma-3-4b-it`.

The real weights cannot be downloaded here, so tests load checkpoints written by this module
exactly as they would gemma-3-4b-it: the model's own config and weights (`save_pretrained`: a
SigLIP tower, the pooling projector, a Gemma 3 text model whose sliding-window layers and global
layers interleave, each kind with its own rotary embedding), Gemma's SentencePiece-style
`tokenizer.json` with `<start_of_turn>`, `<start_of_image>`, `<end_of_image>` and
`<image_soft_token>` named as the processor reads them, the chat template, and
`processor_config.json` / `preprocessor_config.json` with the official fields, only with 112-pixel
images of 16 tokens and a window of 24 tokens (so a prompt outgrows it). Unlike the real model,
the output head is not tied to the embedding (see `spread_weights`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Gemma3Config, Gemma3ForConditionalGeneration, GenerationConfig

from hae_testing.checkpoints.hf_tokenizer import add_tokens, gemma_bpe, save_tokenizer_files, spread_weights, write_json

# chat_template of google/gemma-3-*-it: a system turn joins the first user turn; roles must alternate.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = \"\" -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}{%- endfor -%}"
    "{%- else -%}{{ raise_exception(\"Invalid content type\") }}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}"
)
TURN_TOKENS = ["<start_of_turn>", "<end_of_turn>"]
IMAGE_TOKENS = ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]
IMAGE_SIZE = 112  # pixels (896 on the real model)
PATCH_SIZE = 14
TOKENS_PER_IMAGE = 16  # the 8 x 8 patches pooled 2 x 2 (256 on the real model)
WINDOW = 24  # tokens a sliding layer sees (1024 on the real model)
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]

TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=len(LAYER_TYPES), num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def write_tiny_checkpoint(folder: Path, model_type: str = "gemma3", seed: int = 0) -> Path:
    """Write a tiny random gemma-3-it-style checkpoint into `folder`, loadable by
    `AutoModelForImageTextToText` and `AutoProcessor` like the real repo."""
    if model_type != "gemma3":
        raise ValueError(f"no tiny {model_type} checkpoint here")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = gemma_bpe()
    add_tokens(tokenizer, TURN_TOKENS + IMAGE_TOKENS)
    ids = {token: tokenizer.token_to_id(token) for token in ["<pad>", "<eos>", "<bos>"] + TURN_TOKENS + IMAGE_TOKENS}

    config = Gemma3Config(
        text_config=dict(
            **TINY_TEXT, vocab_size=tokenizer.get_vocab_size(), max_position_embeddings=131072, rms_norm_eps=1e-6,
            sliding_window=WINDOW, layer_types=LAYER_TYPES, hidden_activation="gelu_pytorch_tanh",
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                             "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}},
            final_logit_softcapping=None, attn_logit_softcapping=None, pad_token_id=ids["<pad>"],
            bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"], tie_word_embeddings=False,
        ),
        vision_config=dict(
            model_type="siglip_vision_model", **TINY_VISION, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
            num_channels=3, layer_norm_eps=1e-6, vision_use_head=False,
        ),
        mm_tokens_per_image=TOKENS_PER_IMAGE,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
        tie_word_embeddings=False,
        architectures=["Gemma3ForConditionalGeneration"],
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    spread_weights(model, seed, never_generated=[ids[token] for token in IMAGE_TOKENS])
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<bos>"], pad_token_id=ids["<pad>"], eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]],
        cache_implementation="hybrid", do_sample=True, top_k=64, top_p=0.95,
    )
    model.save_pretrained(folder)

    save_tokenizer_files(
        folder,
        tokenizer,
        {
            "add_bos_token": True,
            "add_eos_token": False,
            "boi_token": "<start_of_image>",
            "bos_token": "<bos>",
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eoi_token": "<end_of_image>",
            "eos_token": "<eos>",
            "extra_special_tokens": {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                     "image_token": "<image_soft_token>"},
            "image_token": "<image_soft_token>",
            "model_max_length": 1000000000000000019884624838656,
            "pad_token": "<pad>",
            "processor_class": "Gemma3Processor",
            "spaces_between_special_tokens": False,
            "tokenizer_class": "GemmaTokenizer",
            "unk_token": "<unk>",
            "use_default_system_prompt": False,
        },
    )
    write_json(folder, "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    write_json(folder, "processor_config.json", {"image_seq_length": TOKENS_PER_IMAGE,
                                                 "processor_class": "Gemma3Processor"})
    write_json(folder, "preprocessor_config.json", {
        "do_convert_rgb": None, "do_normalize": True, "do_pan_and_scan": None, "do_rescale": True,
        "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "Gemma3ImageProcessor",
        "image_seq_length": TOKENS_PER_IMAGE, "image_std": [0.5, 0.5, 0.5], "pan_and_scan_max_num_crops": None,
        "pan_and_scan_min_crop_size": None, "pan_and_scan_min_ratio_to_activate": None,
        "processor_class": "Gemma3Processor", "resample": 2, "rescale_factor": 1 / 255,
        "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    })
    return folder
