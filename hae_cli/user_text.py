"""The one check on text a user gives (a question, a story prompt, a chat line, a workload
entry) before it reaches the tokenizer.

Text arrives as `str` but need not be valid Unicode: bytes that are not UTF-8 on the command
line become lone surrogates (Python's `surrogateescape`, U+DC80..U+DCFF), and a JSON file may
spell a lone surrogate as `\\ud800`. The tokenizer rejects both with a type error deep inside;
here they become one line that says where the bad character is.

Control characters (NUL, BEL, ESC and the terminal sequences it starts, DEL, the C1 range) are
refused the same way: the tokenizer would take them as text, and they change the answer in
silence. Tabs and line breaks are text.

`parse_value` reads a policy parameter's value as typed (`-p gamma=0.9`, a benchmark's or
`hae eval`'s setting): one rule for every place that takes one.
"""

from __future__ import annotations

import re
from typing import Any

from hae_cli.errors import InputError

_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_NAMES = {0x00: "NUL", 0x07: "BEL", 0x08: "BS", 0x1B: "ESC", 0x7F: "DEL", 0x9B: "CSI"}
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
    control = _CONTROL.search(text)
    if control is not None:
        code = ord(control.group())
        name = f"{_NAMES[code]}, " if code in _NAMES else ""
        raise InputError(f"{what} has a control character ({name}U+{code:04X}) at character {control.start() + 1}; "
                         "remove it (a terminal's colour codes or a pasted escape sequence, most likely)")
    if not text.strip():
        raise InputError(f"{what} is empty")
    return text


def parse_value(text: str) -> Any:
    """A policy parameter's value as written: a bool, None, an int, a float, or the string."""
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "on"):
        return True
    if lowered in ("false", "no", "off"):
        return False
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


_IMAGE_NUMBER = re.compile(r"\b(?:image|picture|photo|img)\s*(?:#|no\.?|number)?\s*(\d+)", re.IGNORECASE)


def image_numbers(text: str) -> list[int]:
    """The image numbers a text names ("image 2", "picture #3"), in order, once each."""
    return list(dict.fromkeys(int(number) for number in _IMAGE_NUMBER.findall(text)))


def shown_text(piece: str) -> str:
    """A piece of user text as a note quotes it: characters a terminal would not show as text
    (U+202E turns the line around, U+200B is invisible) written as \\u escapes."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in piece)
