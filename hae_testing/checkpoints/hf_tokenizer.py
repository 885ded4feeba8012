"""Small trained BPE tokenizers laid out like the real `tokenizer.json` of each model lineage.

The real tokenizers of the native VLM families cannot be downloaded here, and transformers 5
rebuilds some of them from `tokenizer.json` alone (`TokenizersBackend` for llava, llava_next and
smolvlm; vocab and merges only for `Qwen2Tokenizer`). So a tiny checkpoint's tokenizer must carry
the lineage's whole pipeline (normalizer, pre-tokenizer, model options, post-processor, decoder)
to split, add BOS and decode the way the real one does. The vocabulary is a byte-level (or
byte-fallback) BPE trained on a short English corpus, so any text still encodes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

# Words of the chat templates, of the tests' prompts, and some answers to generate.
CORPUS = [
    "You are a helpful assistant.",
    "system user assistant System User Assistant USER ASSISTANT [INST] [/INST]",
    "What is shown in this image? What do these images show? Describe the picture in detail.",
    "Describe image 1. Compare image 2 and image 3. What about this image? Tell me a story about it.",
    "The image shows a red circle, a green square and a blue triangle on a white background.",
    "There is a yellow star next to a black line and a gray box. Yes, no, not there.",
    "What color is the shape? How many shapes are there? Where is it? It is on the left, right, top, bottom.",
    "One two three four five six seven eight nine ten. 0 1 2 3 4 5 6 7 8 9",
    "Picture 1: Video 1: row col global img",
]

# Pre-tokenizer regexes of the real tokenizer.json files.
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
LLAMA3_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
SENTENCEPIECE_SPACE = "\u2581"


def qwen2_bpe(vocab_size: int = 480) -> Tokenizer:
    """Qwen2's byte-level BPE (also Qwen2-VL, Qwen2.5-VL and LLaVA-OneVision-Qwen2): NFC, the
    Qwen split regex then bytes, no BOS. The same pipeline `Qwen2Tokenizer.__init__` rebuilds."""
    tokenizer = _byte_level(pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ]), vocab_size)
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return tokenizer


def llama3_bpe(bos: str, vocab_size: int = 480) -> Tokenizer:
    """Llama 3's byte-level BPE (Idefics3-8B-Llama3): its split regex then bytes; the
    post-processor prepends `bos` to every encoding."""
    tokenizer = _byte_level(pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ]), vocab_size)
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        _bos_template(tokenizer, bos),
    ])
    return tokenizer


def gpt2_bpe(leading_specials: list[str], vocab_size: int = 480) -> Tokenizer:
    """GPT-2-style byte-level BPE (SmolLM2, the text model of SmolVLM): the GPT-2 split inside the
    ByteLevel pre-tokenizer, no BOS, and its special tokens at ids 0, 1, ... ahead of the vocabulary."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tokenizer = _byte_level(byte_level, vocab_size, leading_specials)
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    return tokenizer


def tekken_bpe(control_tokens: list[str], vocab_size: int = 480) -> Tokenizer:
    """Mistral's Tekken as a `tokenizer.json` (Mistral-Small-3.1, Pixtral): byte-level BPE after a
    tiktoken-style split, its control tokens (`<unk>`, `<s>`, `</s>`, `[INST]`, ... `[IMG]`) at ids
    0, 1, ... ahead of the vocabulary, and no BOS added (the chat template writes `<s>`)."""
    return _byte_level(pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ]), vocab_size, control_tokens)


def llama2_sentencepiece_bpe(
    unk: str = "<unk>", bos: str = "<s>", eos: str = "</s>", vocab_size: int = 480
) -> Tokenizer:
    """Llama 2's (and Mistral 7B's) SentencePiece BPE converted to tokenizer.json, as in the
    llava-hf repos: spaces become "▁" with one prepended, unknown characters fall back to the
    `<0xNN>` byte tokens at ids 3-258, and the post-processor prepends `bos`."""
    return sentencepiece_bpe([unk, bos, eos], unk, bos, prepend_space=True, vocab_size=vocab_size)


def gemma_bpe(vocab_size: int = 480) -> Tokenizer:
    """Gemma 3's SentencePiece BPE as its tokenizer.json has it: `<pad>`, `<eos>`, `<bos>`, `<unk>`
    at ids 0-3, spaces become "▁" with none prepended, byte fallback, runs of newlines as tokens
    of their own (so a blank line next to an image's expansion merges with its neighbours), and
    the post-processor prepends `<bos>`."""
    corpus = CORPUS + ["\n".join(CORPUS[:4]), "\n\n".join(CORPUS[4:]), "a\n\n\nb\n\nc"]
    return sentencepiece_bpe(["<pad>", "<eos>", "<bos>", "<unk>"], "<unk>", "<bos>", prepend_space=False,
                             vocab_size=vocab_size, corpus=corpus)


def sentencepiece_bpe(specials: list[str], unk: str, bos: str, *, prepend_space: bool, vocab_size: int = 480,
                      corpus: list[str] = CORPUS) -> Tokenizer:
    """A SentencePiece BPE converted to tokenizer.json: `specials` first, then the 256 `<0xNN>`
    byte tokens, then the merges trained on `corpus`; "▁" for spaces (one prepended where
    `prepend_space`), byte fallback, `bos` prepended by the post-processor."""
    tokenizer = Tokenizer(models.BPE(unk_token=unk))
    steps = [normalizers.Prepend(SENTENCEPIECE_SPACE)] if prepend_space else []
    tokenizer.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SENTENCEPIECE_SPACE)])
    # Training only: keep merges inside words, as SentencePiece does.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(SENTENCEPIECE_SPACE, behavior="merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 256, special_tokens=specials, show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)

    trained = json.loads(tokenizer.to_str())["model"]
    byte_tokens = [f"<0x{value:02X}>" for value in range(256)]
    pieces = [token for token, _ in sorted(trained["vocab"].items(), key=lambda item: item[1])]
    ordered = specials + byte_tokens + [token for token in pieces if token not in specials]
    vocab = {token: index for index, token in enumerate(ordered)}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]

    converted = Tokenizer(models.BPE(vocab, merges, unk_token=unk, byte_fallback=True, fuse_unk=True))
    converted.normalizer = tokenizer.normalizer
    strip = [decoders.Strip(" ", 1, 0)] if prepend_space else []
    converted.decoder = decoders.Sequence([
        decoders.Replace(SENTENCEPIECE_SPACE, " "),
        decoders.ByteFallback(),
        decoders.Fuse(),
        *strip,
    ])
    converted.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    converted.post_processor = _bos_template(converted, bos)
    return converted


def add_tokens(tokenizer: Tokenizer, tokens: list[str], special: bool = True) -> None:
    """Append `tokens` as added tokens (never split), after the vocabulary, as the VLM repos add
    their image tokens to the base tokenizer."""
    added = [AddedToken(t, special=special, normalized=False) for t in tokens]
    if special:
        tokenizer.add_special_tokens(added)
    else:
        tokenizer.add_tokens(added)


def added_tokens_entries(decoder: dict) -> dict:
    """`tokenizer_config.json`'s `added_tokens_decoder`: every added token (id -> `AddedToken`)
    with its flags, as the hub files list them."""
    return {
        str(index): {
            "content": token.content,
            "lstrip": token.lstrip,
            "normalized": token.normalized,
            "rstrip": token.rstrip,
            "single_word": token.single_word,
            "special": token.special,
        }
        for index, token in sorted(decoder.items())
    }


def save_tokenizer_files(
    folder: Path, tokenizer: Tokenizer, tokenizer_config: dict, *, vocab_files: bool = False
) -> None:
    """Write `tokenizer.json`, `tokenizer_config.json` (given fields plus every added token, as
    the hub files list them) and `special_tokens_map.json`; `vocab_files` also writes the
    `vocab.json` + `merges.txt` that byte-level BPE repos ship."""
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"added_tokens_decoder": added_tokens_entries(tokenizer.get_added_tokens_decoder()), **tokenizer_config}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    names = ("bos_token", "eos_token", "unk_token", "pad_token", "additional_special_tokens")
    special_map = {name: config[name] for name in names if config.get(name) is not None}
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2, ensure_ascii=False))
    if vocab_files:
        tokenizer.model.save(str(folder))


def _byte_level(pre_tokenizer, vocab_size: int, leading_specials: list[str] = ()) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(leading_specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def _bos_template(tokenizer: Tokenizer, bos: str) -> processors.TemplateProcessing:
    bos_id = tokenizer.token_to_id(bos)
    if bos_id is None:
        add_tokens(tokenizer, [bos])
        bos_id = tokenizer.token_to_id(bos)
    return processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
    )


# Shared by the tiny checkpoint writers of every family (hae_cli/model/<family>/tiny.py).

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]  # the image normalisation of CLIP-trained towers
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def spread_weights(model: torch.nn.Module, seed: int, never_generated: list[int] = ()) -> None:
    """Redraw every weight from `seed`: N(0, 1/fan_in) matrices (each expert's, for a mixture of
    experts' packed `[E, out, in]`), N(0, 1) embeddings and free
    vectors, norms kept at one and biases at zero; the output rows of `never_generated` tokens
    are zero, so their logit (0) stays under the top one.

    transformers' init (std 0.02) leaves a tiny model with near-uniform attention and logit gaps
    under 1e-4, where greedy tokens flip on float noise; these weights make exactness tests on a
    tiny model mean something. The head must not be tied to the input embedding: tied, either
    the current token's own logit or the fixed context dominates, and greedy decoding repeats one
    token. An image placeholder is never generated, as by the real models: written back into the
    next turn, the processor would count it as an image.
    """
    head = model.get_output_embeddings()
    if head.weight is model.get_input_embeddings().weight:
        raise ValueError("spread_weights needs an output head untied from the input embedding")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            is_norm = "norm" in type(module).__name__.lower()
            for name, weight in module.named_parameters(recurse=False):
                if isinstance(module, torch.nn.Embedding) or (weight.dim() == 1 and not is_norm and name != "bias"):
                    std = 1.0
                elif weight.dim() == 3 and not isinstance(module, torch.nn.Conv1d):  # experts: [E, out, in]
                    std = weight.shape[-1] ** -0.5
                elif weight.dim() >= 2:
                    std = weight[0].numel() ** -0.5
                else:
                    continue
                weight.copy_(torch.randn(weight.shape, generator=generator) * std)
        head.weight[list(never_generated)] = 0.0


def write_json(folder: Path, name: str, data: dict) -> None:
    (folder / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
