"""How an answer is scored: normalised exact match against the references (the VQA rules),
the letter chosen in a multiple-choice question, and, where there is no reference, agreement
with the full cache (the same answer; the share of its tokens reproduced in place). `hae
profile`'s measures (`token_match`, `holds_answer`) are here too: one module scores answers."""

from __future__ import annotations

import re
from collections.abc import Sequence

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."

# The VQA evaluation's rules (Antol et al. 2015, the official vqaEval.py): number words up to
# ten as digits, articles dropped, punctuation dropped (a comma inside a number and a decimal
# point kept as the number reads), case folded.
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
_NUMBER_COMMA = re.compile(r"(?<=\d),(?=\d)")
_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")
_APOSTROPHE = re.compile(r"['\u2019]")
_PUNCTUATION = re.compile(r"[^\w\s.]|_")


def normalize_answer(text: str) -> str:
    """"The Two dogs." -> "2 dogs"; "1,000" -> "1000"; "3.5" stays."""
    text = _NUMBER_COMMA.sub("", text.lower().replace("\n", " ").replace("\t", " ").strip())
    text = _PERIOD.sub("", _PUNCTUATION.sub(" ", _APOSTROPHE.sub("", text)))
    words = text.split()
    kept = [word for word in words if word not in ARTICLES] or words  # "a" alone is an answer, not an article
    return " ".join(NUMBER_WORDS.get(word, word) for word in kept)


def exact_match(answer: str, references: Sequence[str]) -> bool:
    """The answer equals one of the references once both are normalised."""
    mine = normalize_answer(answer)
    return bool(mine) and any(mine == normalize_answer(reference) for reference in references)


def choice_prompt(question: str, choices: Sequence[str]) -> str:
    """The question with its lettered options and the instruction to answer with a letter."""
    options = "\n".join(f"{LETTERS[k]}. {choice}" for k, choice in enumerate(choices))
    return f"{question}\n{options}\n{CHOICE_INSTRUCTION}"


# "B", "B.", "B) dog", "(B) dog"; not "A dog" (a word), nor a lowercase "a"
_LEADING_LETTER = re.compile(r"^\s*(?:\(([A-Z])\)|([A-Z])(?=[.:)]|\s*$))")
_STATED_LETTER = re.compile(r"\b(?i:answer)\s*(?:(?i:is)\s*)?[:\-]?\s*\(?([A-Z])\b")


def chosen_letter(answer: str, choices: Sequence[str]) -> str | None:
    """The option an answer chose: a leading letter ("B", "(B) cat", "B. cat"), a stated one
    ("The answer is B"), or an option's text; None when it names none."""
    letters = LETTERS[: len(choices)]
    for pattern in (_LEADING_LETTER, _STATED_LETTER):
        found = pattern.search(answer)
        letter = next((g for g in found.groups() if g), None) if found else None
        if letter is not None and letter in letters:
            return letter
    mine = normalize_answer(answer)
    named = [letters[k] for k, choice in enumerate(choices) if mine and mine == normalize_answer(choice)]
    return named[0] if len(named) == 1 else None


def reference_letter(answer: object, choices: Sequence[str]) -> str | None:
    """A multiple-choice record's answer as a letter: given as the letter, the option's text, or
    its 0-based index; None when it is none of the options."""
    letters = LETTERS[: len(choices)]
    if isinstance(answer, bool):
        return None
    if isinstance(answer, int):
        return letters[answer] if 0 <= answer < len(letters) else None
    if not isinstance(answer, str):
        return None
    if answer.strip().upper() in letters and len(answer.strip()) == 1:
        return answer.strip().upper()
    return chosen_letter(answer, choices) if normalize_answer(answer) in map(normalize_answer, choices) else None


def agreement(ids: Sequence[int], full_ids: Sequence[int]) -> float:
    """Share of the full cache's output tokens that this output reproduces at the same place."""
    if not full_ids:
        return float(not ids)
    return sum(a == b for a, b in zip(ids, full_ids)) / len(full_ids)


def token_match(full_ids: Sequence[int], ids: Sequence[int]) -> tuple[bool, float, int | None]:
    """`hae profile`'s agreement with the full cache: (the same answer token for token, % of the
    longer answer's tokens matched in place, the first index where they differ)."""
    first = next((i for i, (a, b) in enumerate(zip(full_ids, ids)) if a != b), None)
    if first is None and len(full_ids) != len(ids):
        first = min(len(full_ids), len(ids))
    matched = sum(a == b for a, b in zip(full_ids, ids))
    percent = 100.0 * matched / max(len(full_ids), len(ids)) if (full_ids or ids) else 100.0
    return first is None, percent, first


def holds_answer(text: str, expected: str) -> bool:
    """`hae profile`'s correctness: the expected answer appears in the generated text as whole
    words, ignoring case."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    wanted = re.findall(r"[a-z0-9]+", expected.lower())
    n = len(wanted)
    return n > 0 and any(words[i : i + n] == wanted for i in range(len(words) - n + 1))


def score_answer(text: str, ids: Sequence[int], full_ids: Sequence[int], answers: Sequence[str],
                 choices: Sequence[str]) -> tuple[str, float]:
    """(metric, score): the option chosen against the right letter; the answer against the
    references; with neither, whether it is the full cache's answer, token for token."""
    if choices and answers:
        return "choice", float(chosen_letter(text, choices) == answers[0])
    if answers:
        return "exact", float(exact_match(text, answers))
    return "agreement", float(list(ids) == list(full_ids))
