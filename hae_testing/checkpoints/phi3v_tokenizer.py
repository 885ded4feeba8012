"""A word-level tokenizer with Phi-3.5-Vision's special tokens and chat template.

Tests and the tiny demo checkpoint need a tokenizer that is small, readable, builds offline and
loads exactly like the official one (`AutoTokenizer.from_pretrained(folder)`), so everything
downstream of the tokenizer runs the same code path as with the real model.
"""

from __future__ import annotations

import re

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers
from transformers import PreTrainedTokenizerFast

PHI35V_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
    "{{- '<|assistant|>\n' -}}"
    "{% endif %}"
)
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<|endoftext|>"

# Words are runs of word characters; each punctuation mark and each newline is its own token.
# The newline must survive because the chat template puts one after every role tag.
_SPACES = r"[^\S\n]+"
_ISOLATED = r"\n|[^\w\s]"
# Decoding joins tokens with spaces, then removes the space before closing punctuation and
# newlines and around chat tags, so "Image 1: a red circle." round-trips (lower-cased).
_NO_SPACE_BEFORE = r" (?=[.,:;!?%)\]}\n]|<\|)"
_NO_SPACE_AFTER = r"(?<=\n|\|>) "


def _pieces(text: str) -> list[str]:
    """The same split the pre-tokenizer makes, to build the vocabulary from free text."""
    chunks = re.split(_SPACES, text.lower())
    return [p for chunk in chunks for p in re.split(f"({_ISOLATED})", chunk) if p]


def build_tiny_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A tokenizer whose vocabulary is `words` (lower-cased, deduplicated, split as the
    pre-tokenizer would, so a phrase may be passed) plus the newline.

    Ids: <unk>=0, <s>=1 (bos), </s>=2 (eos), the words, "\\n", <|endoftext|> (pad), then the chat
    tokens <|system|>, <|user|>, <|assistant|>, <|end|> as special tokens (never split).
    """
    vocab: dict[str, int] = {UNK: 0, BOS: 1, EOS: 2}
    for word in words:
        for piece in _pieces(word):
            vocab.setdefault(piece, len(vocab))
    vocab.setdefault("\n", len(vocab))
    for token in [PAD, *CHAT_TOKENS]:  # cannot clash: "<" and "|" split off any word
        vocab[token] = len(vocab)

    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPACES), behavior="removed"),
            pre_tokenizers.Split(Regex(_ISOLATED), behavior="isolated"),
        ]
    )
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.WordPiece(prefix="##", cleanup=False),
            decoders.Fuse(),
            decoders.Replace(Regex(_NO_SPACE_BEFORE), ""),
            decoders.Replace(Regex(_NO_SPACE_AFTER), ""),
        ]
    )
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in [UNK, BOS, EOS, PAD, *CHAT_TOKENS]]
    )

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens=CHAT_TOKENS,
        clean_up_tokenization_spaces=False,
        # Like the official (Llama) tokenizer: encoding with special tokens prepends <s>.
        add_bos_token=True,
        add_eos_token=False,
    )
    fast.chat_template = PHI35V_CHAT_TEMPLATE
    return fast
