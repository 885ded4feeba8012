"""The one check on text a user gives (a question, a story prompt, a workload entry) before it
reaches the tokenizer.

Text arrives as `str` but need not be valid Unicode: bytes that are not UTF-8 on the command
line become lone surrogates (Python's `surrogateescape`, U+DC80..U+DCFF), and a JSON file may
spell a lone surrogate as `\\ud800`. The tokenizer rejects both with a type error deep inside;
here they become one line that says where the bad character is.
"""

from __future__ import annotations

import re

from hae_cli.errors import InputError

_SURROGATE = re.compile("[\ud800-\udfff]")
_ESCAPED_BYTE = range(0xDC80, 0xDD00)  # surrogateescape: byte b -> U+DC00 + b


def checked_text(text: object, what: str) -> str:
    """`text` if it is a non-empty string of valid Unicode; else `InputError` naming `what`
    ("the question", "--prompt", "questions.json: entry 3 question")."""
    if not isinstance(text, str):
        raise InputError(f"{what} must be text, got {type(text).__name__}")
    bad = _SURROGATE.search(text)
    if bad is not None:
        code = ord(bad.group())
        where = f"at character {bad.start() + 1}"
        if code in _ESCAPED_BYTE:
            raise InputError(
                f"{what} is not valid UTF-8: byte 0x{code - 0xDC00:02x} {where}; write it in UTF-8"
            )
        raise InputError(f"{what} is not valid Unicode: a lone surrogate U+{code:04X} {where}")
    if not text.strip():
        raise InputError(f"{what} is empty")
    return text
