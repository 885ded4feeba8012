"""Tiny random Idefics3 / SmolVLM checkpoints in the hub layout.

The real weights cannot be downloaded here, so tests load checkpoints written by this module
exactly as they would `HuggingFaceM4/Idefics3-8B-Llama3` or
`HuggingFaceTB/SmolVLM2-256M-Video-Instruct`: the model's own config and weights
(`save_pretrained`), the text model's tokenizer lineage (Llama 3, SmolLM2) with the image tokens
added as those repos add them, `chat_template.json`, `processor_config.json` (`image_seq_len`) and
`preprocessor_config.json` with the official fields, only with small tiles (56 and 128 pixels) of
4 image tokens each and images split into at most 2 x 2 tiles plus the global image. Unlike
SmolVLM2-256M, the output head is not tied to the embedding (see `spread_weights`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)

from hae_testing.checkpoints.hf_tokenizer import (
    add_tokens,
    gpt2_bpe,
    llama3_bpe,
    save_tokenizer_files,
    spread_weights,
    write_json,
)

# chat_template.json of HuggingFaceM4/Idefics3-8B-Llama3.
IDEFICS3_CHAT_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
# chat_template.json of HuggingFaceTB/SmolVLM2-256M-Video-Instruct, for images and text.
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

IMAGE_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]
# Idefics3's Llama 3 tokenizer keeps `<row_1_col_1>` and `<global-img>` as plain text; SmolVLM's
# adds them as tokens.
LLAMA3_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|start_header_id|>",
    "<|end_header_id|>", "<|eot_id|>",
]  # fmt: skip
SMOLLM2_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>", "<filename>",
    "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>", "<jupyter_text>",
    "<jupyter_code>", "<jupyter_output>", "<jupyter_script>", "<empty_output>",
]  # fmt: skip
SMOLVLM_TILE_TOKENS = ["<global-img>"] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]

TINY_TEXT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)
VARIANTS = {
    # SigLIP/14 at 364 px, pixel shuffle 2: 169 tokens a tile. Here 56 px: 4 x 4 patches, 4 tokens.
    "idefics3": dict(
        config_class=Idefics3Config,
        model_class=Idefics3ForConditionalGeneration,
        processor_class="Idefics3Processor",
        image_processor="Idefics3ImageProcessor",
        chat_template=IDEFICS3_CHAT_TEMPLATE,
        tile=56, patch=14, scale_factor=2, rope_theta=500000.0,
    ),
    # SigLIP/16 at 512 px, pixel shuffle 4: 64 tokens a tile. Here 128 px: 8 x 8 patches, 4 tokens.
    "smolvlm": dict(
        config_class=SmolVLMConfig,
        model_class=SmolVLMForConditionalGeneration,
        processor_class="SmolVLMProcessor",
        image_processor="SmolVLMImageProcessor",
        chat_template=SMOLVLM_CHAT_TEMPLATE,
        tile=128, patch=16, scale_factor=4, rope_theta=100000.0,
    ),
}  # fmt: skip
# An image is resized to this many tiles on its longest side (4 in the real repos), then split.
TILES_ON_LONGEST_SIDE = 2


def write_tiny_checkpoint(folder: Path, model_type: str, seed: int = 0) -> Path:
    """Write a tiny random `model_type` ("idefics3" or "smolvlm") checkpoint into `folder`,
    loadable by `AutoModelForImageTextToText` and `AutoProcessor` like the real repos."""
    variant = VARIANTS[model_type]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ids, generation_config = (_llama3_tokenizer if model_type == "idefics3" else _smollm2_tokenizer)(folder)

    config = variant["config_class"](
        text_config=dict(
            **TINY_TEXT,
            model_type="llama",
            vocab_size=ids["vocab_size"],
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
            rope_theta=variant["rope_theta"],
            bos_token_id=generation_config.bos_token_id,
            eos_token_id=generation_config.eos_token_id[0],
            pad_token_id=generation_config.pad_token_id,
            tie_word_embeddings=False,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=variant["tile"],
            patch_size=variant["patch"],
        ),
        image_token_id=ids["<image>"],
        scale_factor=variant["scale_factor"],
        tie_word_embeddings=False,
        architectures=[variant["model_class"].__name__],
    )
    torch.manual_seed(seed)
    model = variant["model_class"](config)
    spread_weights(model, seed, never_generated=[ids["<image>"]])
    model.generation_config = generation_config
    model.save_pretrained(folder)

    image_seq_len = (variant["tile"] // variant["patch"]) ** 2 // variant["scale_factor"] ** 2
    write_json(folder, "chat_template.json", {"chat_template": variant["chat_template"]})
    processor_config = {"image_seq_len": image_seq_len, "processor_class": variant["processor_class"]}
    write_json(folder, "processor_config.json", processor_config)
    write_json(
        folder,
        "preprocessor_config.json",
        {
            "do_convert_rgb": True,
            "do_image_splitting": True,
            "do_normalize": True,
            "do_pad": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_processor_type": variant["image_processor"],
            "image_std": [0.5, 0.5, 0.5],
            "max_image_size": {"longest_edge": variant["tile"]},
            "processor_class": variant["processor_class"],
            "resample": 1,
            "rescale_factor": 1 / 255,
            "size": {"longest_edge": TILES_ON_LONGEST_SIDE * variant["tile"]},
        },
    )
    return folder


def _llama3_tokenizer(folder: Path) -> tuple[dict[str, int], GenerationConfig]:
    """Llama 3's byte-level BPE (BOS prepended to every encoding) with Idefics3's three tokens."""
    tokenizer = llama3_bpe(bos=LLAMA3_SPECIALS[0])
    add_tokens(tokenizer, LLAMA3_SPECIALS[1:] + IMAGE_TOKENS)
    save_tokenizer_files(
        folder,
        tokenizer,
        {
            "additional_special_tokens": IMAGE_TOKENS,
            "bos_token": "<|begin_of_text|>",
            "clean_up_tokenization_spaces": False,  # the real True is ignored (with a warning) for BPE in 5.x
            "eos_token": "<|end_of_text|>",
            "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": 1000000000000000019884624838656,
            "pad_token": "<|reserved_special_token_0|>",
            "processor_class": "Idefics3Processor",
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
    )
    ids = {token: tokenizer.token_to_id(token) for token in LLAMA3_SPECIALS + IMAGE_TOKENS}
    ids["vocab_size"] = tokenizer.get_vocab_size()
    generation_config = GenerationConfig(
        bos_token_id=ids["<|begin_of_text|>"],
        eos_token_id=[ids["<|end_of_text|>"], ids["<end_of_utterance>"]],
        pad_token_id=ids["<|reserved_special_token_0|>"],
    )
    return ids, generation_config


def _smollm2_tokenizer(folder: Path) -> tuple[dict[str, int], GenerationConfig]:
    """SmolLM2's GPT-2-style byte-level BPE (no BOS added) with SmolVLM's image, tile and
    end-of-utterance tokens."""
    tokenizer = gpt2_bpe(leading_specials=SMOLLM2_SPECIALS)
    add_tokens(tokenizer, IMAGE_TOKENS + SMOLVLM_TILE_TOKENS + ["<video>"])
    save_tokenizer_files(
        folder,
        tokenizer,
        {
            "add_prefix_space": False,
            "additional_special_tokens": IMAGE_TOKENS + SMOLVLM_TILE_TOKENS,
            "bos_token": "<|im_start|>",
            "clean_up_tokenization_spaces": False,
            "eos_token": "<end_of_utterance>",
            "extra_special_tokens": {
                "end_of_utterance_token": "<end_of_utterance>",
                "fake_image_token": "<fake_token_around_image>",
                "global_image_token": "<global-img>",
                "image_token": "<image>",
            },
            "model_max_length": 8192,
            "pad_token": "<|im_end|>",
            "processor_class": "SmolVLMProcessor",
            "tokenizer_class": "GPT2Tokenizer",
            "unk_token": "<|endoftext|>",
            "vocab_size": tokenizer.get_vocab_size(),
        },
        vocab_files=True,
    )
    ids = {token: tokenizer.token_to_id(token) for token in SMOLLM2_SPECIALS + IMAGE_TOKENS}
    ids["vocab_size"] = tokenizer.get_vocab_size()
    generation_config = GenerationConfig(
        bos_token_id=ids["<|im_start|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<end_of_utterance>"]],
        pad_token_id=ids["<|im_end|>"],
    )
    return ids, generation_config
