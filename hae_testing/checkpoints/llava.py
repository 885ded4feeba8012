"""Tiny random LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision checkpoints in the llava-hf layout.

The real weights cannot be downloaded here, so tests load checkpoints written by this module
exactly as they would `llava-hf/llava-1.5-7b-hf`, `llava-hf/llava-v1.6-mistral-7b-hf` or
`llava-hf/llava-onevision-qwen2-0.5b-ov-hf`: the model's own config and weights
(`save_pretrained`), the tokenizer of the real text model's lineage with `<image>` (and
`<video>`) added, `chat_template.json`, `processor_config.json` and `preprocessor_config.json`
with the official fields, only with a vision tower of 42-56 pixels so an image is a few dozen
tokens. Unlike OneVision-0.5B, the output head is not tied to the embedding (see
`spread_weights`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForImageTextToText,
    GenerationConfig,
    LlavaConfig,
    LlavaNextConfig,
    LlavaOnevisionConfig,
)

from hae_testing.checkpoints.hf_tokenizer import (
    CLIP_MEAN,
    CLIP_STD,
    add_tokens,
    llama2_sentencepiece_bpe,
    qwen2_bpe,
    save_tokenizer_files,
    spread_weights,
    write_json,
)

# chat_template.json of llava-hf/llava-1.5-7b-hf.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# chat_template.json of llava-hf/llava-v1.6-mistral-7b-hf (its current form, with `</s> ` after an
# answer; an older revision wrote a literal `<\s> `).
LLAVA_NEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '</s> '}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# chat_template.json of llava-hf/llava-onevision-qwen2-*-ov-hf.
LLAVA_ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\n' + content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

PATCH_SIZE = 14
TINY_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=PATCH_SIZE
)
TINY_TEXT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)


def write_tiny_checkpoint(folder: Path, model_type: str, seed: int = 0) -> Path:
    """Write a tiny random `model_type` ("llava", "llava_next" or "llava_onevision") checkpoint
    into `folder`, loadable by `AutoModelForImageTextToText` and `AutoProcessor` like the real
    llava-hf repo of that family."""
    writers = {"llava": _llava, "llava_next": _llava_next, "llava_onevision": _llava_onevision}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config, generation_config = writers[model_type](folder)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    placeholders = [config.image_token_index, getattr(config, "video_token_index", config.image_token_index)]
    spread_weights(model, seed, never_generated=placeholders)
    model.generation_config = generation_config
    model.save_pretrained(folder)
    return folder


def _llava(folder: Path) -> tuple[LlavaConfig, GenerationConfig]:
    """llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14-336 (here 56 px: a 4 x 4 grid), Vicuna (Llama 2)."""
    image_size = 56
    tokenizer, ids = _llama2_tokenizer(folder, "LlavaProcessor", pad="<pad>", model_max_length=4096)
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", image_size=image_size, projection_dim=32, **TINY_VISION),
        text_config=dict(model_type="llama", vocab_size=tokenizer.get_vocab_size(), max_position_embeddings=4096,
                         rms_norm_eps=1e-5, pad_token_id=ids["<pad>"], **TINY_TEXT),
        image_token_index=ids["<image>"],
        image_seq_length=(image_size // PATCH_SIZE) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        pad_token_id=ids["<pad>"],
        architectures=["LlavaForConditionalGeneration"],
    )  # fmt: skip
    _write_clip_preprocessor(folder, "CLIPImageProcessor", "LlavaProcessor", image_size)
    _write_processor_config(folder, "LlavaProcessor", LLAVA_CHAT_TEMPLATE, patch_size=PATCH_SIZE,
                            num_additional_image_tokens=1, vision_feature_select_strategy="default",
                            image_token="<image>")  # fmt: skip
    return config, GenerationConfig(bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"])


def _llava_next(folder: Path) -> tuple[LlavaNextConfig, GenerationConfig]:
    """llava-hf/llava-v1.6-mistral-7b-hf: CLIP ViT-L/14-336 (here 42 px: 3 x 3 patches) on the base
    view and on the anyres crops, Mistral 7B."""
    image_size = 42
    pinpoints = [[image_size * h, image_size * w] for h, w in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))]
    tokenizer, ids = _llama2_tokenizer(folder, "LlavaNextProcessor", pad="<unk>", model_max_length=32768)
    config = LlavaNextConfig(
        vision_config=dict(model_type="clip_vision_model", image_size=image_size, projection_dim=32, **TINY_VISION),
        text_config=dict(model_type="mistral", vocab_size=tokenizer.get_vocab_size(), max_position_embeddings=32768,
                         rms_norm_eps=1e-5, rope_theta=1000000.0, sliding_window=None, **TINY_TEXT),
        image_token_index=ids["<image>"],
        image_grid_pinpoints=pinpoints,
        image_seq_length=(image_size // PATCH_SIZE) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        pad_token_id=ids["<unk>"],
        architectures=["LlavaNextForConditionalGeneration"],
    )  # fmt: skip
    _write_clip_preprocessor(folder, "LlavaNextImageProcessor", "LlavaNextProcessor", image_size,
                             image_grid_pinpoints=pinpoints, aspect_ratio_setting="anyres", do_pad=True)  # fmt: skip
    _write_processor_config(folder, "LlavaNextProcessor", LLAVA_NEXT_CHAT_TEMPLATE, patch_size=PATCH_SIZE,
                            num_additional_image_tokens=1, vision_feature_select_strategy="default",
                            image_token="<image>")  # fmt: skip
    return config, GenerationConfig(bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<unk>"])


def _llava_onevision(folder: Path) -> tuple[LlavaOnevisionConfig, GenerationConfig]:
    """llava-hf/llava-onevision-qwen2-0.5b-ov-hf: SigLIP so400m/14-384 (here 42 px: 3 x 3 patches,
    no CLS), anyres up to 6 x 6 crops pooled to at most about 9, Qwen2 0.5B."""
    image_size = 42
    pinpoints = [[image_size * h, image_size * w] for h in range(1, 7) for w in range(1, 7)]
    tokenizer = qwen2_bpe()
    add_tokens(tokenizer, ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"])
    ids = {token: tokenizer.token_to_id(token) for token in ("<|endoftext|>", "<|im_end|>", "<image>", "<video>")}
    save_tokenizer_files(
        folder,
        tokenizer,
        {
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<image>", "<video>"],
            "bos_token": None,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "model_max_length": 32768,
            "pad_token": "<|endoftext|>",
            "padding_side": "left",
            "processor_class": "LlavaOnevisionProcessor",
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        },
        vocab_files=True,
    )
    config = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", image_size=image_size, layer_norm_eps=1e-6,
                           vision_use_head=False, **TINY_VISION),
        text_config=dict(model_type="qwen2", vocab_size=tokenizer.get_vocab_size(), max_position_embeddings=32768,
                         rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], **TINY_TEXT),
        image_token_index=ids["<image>"],
        video_token_index=ids["<video>"],
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
        architectures=["LlavaOnevisionForConditionalGeneration"],
    )  # fmt: skip
    write_json(
        folder,
        "preprocessor_config.json",
        {
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_pad": True,
            "do_rescale": True,
            "do_resize": True,
            "image_grid_pinpoints": pinpoints,
            "image_mean": [0.5, 0.5, 0.5],
            "image_processor_type": "LlavaOnevisionImageProcessor",
            "image_std": [0.5, 0.5, 0.5],
            "processor_class": "LlavaOnevisionProcessor",
            "resample": 3,
            "rescale_factor": 1 / 255,
            "size": {"height": image_size, "width": image_size},
        },
    )
    _write_processor_config(folder, "LlavaOnevisionProcessor", LLAVA_ONEVISION_CHAT_TEMPLATE,
                            num_image_tokens=(image_size // PATCH_SIZE) ** 2, vision_feature_select_strategy="full",
                            vision_aspect_ratio="anyres_max_9", image_token="<image>",
                            video_token="<video>")  # fmt: skip
    return config, GenerationConfig(
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]
    )


def _llama2_tokenizer(folder: Path, processor_class: str, pad: str, model_max_length: int):
    """The Llama 2 / Mistral SentencePiece BPE of the llava-hf repos, `<image>` added after it
    (and `<pad>` where the repo has one), BOS prepended to every encoding."""
    tokenizer = llama2_sentencepiece_bpe()
    add_tokens(tokenizer, ["<image>"] + ([pad] if pad == "<pad>" else []))
    save_tokenizer_files(
        folder,
        tokenizer,
        {
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": "<s>",
            "clean_up_tokenization_spaces": False,
            "eos_token": "</s>",
            "legacy": False,
            "model_max_length": model_max_length,
            "pad_token": pad,
            "padding_side": "left",
            "processor_class": processor_class,
            "sp_model_kwargs": {},
            "tokenizer_class": "LlamaTokenizer",
            "unk_token": "<unk>",
            "use_default_system_prompt": False,
        },
    )
    ids = {token: tokenizer.token_to_id(token) for token in ("<unk>", "<s>", "</s>", "<image>", pad)}
    return tokenizer, ids


def _write_clip_preprocessor(
    folder: Path, image_processor: str, processor_class: str, image_size: int, **extra
) -> None:
    write_json(
        folder,
        "preprocessor_config.json",
        {
            "crop_size": {"height": image_size, "width": image_size},
            "do_center_crop": True,
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": CLIP_MEAN,
            "image_processor_type": image_processor,
            "image_std": CLIP_STD,
            "processor_class": processor_class,
            "resample": 3,
            "rescale_factor": 1 / 255,
            "size": {"shortest_edge": image_size},
            **extra,
        },
    )


def _write_processor_config(folder: Path, processor_class: str, chat_template: str, **fields) -> None:
    write_json(folder, "processor_config.json", {**fields, "processor_class": processor_class})
    write_json(folder, "chat_template.json", {"chat_template": chat_template})
