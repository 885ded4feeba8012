"""easy-VQA (the `easy-vqa` package) as the demo model and the benchmarks see it.

easy-VQA has 64x64 images of one coloured shape each, and about ten one-word questions per
image. Each image's colour and shape are not stored as labels, but every image has questions
that name them ("what color is the triangle?" -> "red"); `image_attributes` reads them back,
and the multi-image captioning task ("story") is built from them:
"Image 1: a red triangle. Image 2: a blue circle."
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

SPLITS = ("train", "test")
COLORS = ("red", "green", "blue", "yellow", "black", "gray", "teal", "brown")
SHAPES = ("circle", "rectangle", "triangle")
STORY_PROMPT = "Describe each image in order."
# Words the questions addressed to an image add to the vocabulary (`conversation_sets.py`).
CONVERSATION_WORDS = ("which", "shows", "in", "image")
MAX_STORY_IMAGES = 8


@dataclass(frozen=True)
class Question:
    question: str
    answer: str
    image_id: int


@lru_cache(maxsize=None)
def load_split(split: str) -> tuple[Question, ...]:
    """Every question of a split, in the package's order."""
    import easy_vqa

    _check_split(split)
    getter = easy_vqa.get_train_questions if split == "train" else easy_vqa.get_test_questions
    questions, answers, image_ids = getter()
    return tuple(Question(q, a, int(i)) for q, a, i in zip(questions, answers, image_ids))


@lru_cache(maxsize=None)
def image_paths(split: str) -> dict[int, Path]:
    """Image id -> PNG path."""
    import easy_vqa

    _check_split(split)
    getter = easy_vqa.get_train_image_paths if split == "train" else easy_vqa.get_test_image_paths
    return {int(k): Path(v) for k, v in getter().items()}


def image_path(image_id: int, split: str) -> Path:
    return image_paths(split)[image_id]


_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class QuestionParts:
    """What a question names (each None when it names none) and whether it is negated:
    "is there not a red shape?" and "is no circle present?" ask about absence."""

    color: str | None
    shape: str | None
    negated: bool

    @property
    def named(self) -> list[str]:
        return [v for v in (self.color, self.shape) if v is not None]


def question_parts(question: str) -> QuestionParts:
    words = _WORD.findall(question.lower())
    color = next((w for w in words if w in COLORS), None)
    shape = next((w for w in words if w in SHAPES), None)
    return QuestionParts(color, shape, "not" in words or "no" in words[1:])


def names_what_is_there(q: Question) -> bool | None:
    """For a yes/no question, whether what it names is in the image (the answer, unless the
    question is negated); None for a "what" question."""
    if q.answer not in ("yes", "no"):
        return None
    return (q.answer == "yes") != question_parts(q.question).negated


@lru_cache(maxsize=None)
def image_attributes(split: str) -> dict[int, tuple[str, str]]:
    """Image id -> (colour, shape), read from the questions that name them, for every image
    whose questions pin both down.

    A "what"-question's answer names the attribute it asks for, and the question may name the
    other one; a yes/no answer says a named colour or shape is present or absent, and a
    value is also known once all the others are absent. A few images' questions never pin
    the colour down (e.g. only "is there a green shape?" -> "no"); they are left out.
    Conflicting evidence raises (it would mean a misread question).
    """
    present: dict[int, dict[str, str]] = {}
    absent: dict[int, set[str]] = {}
    for q in load_split(split):
        named = question_parts(q.question).named
        found = present.setdefault(q.image_id, {})
        evidence = [q.answer] if q.answer in COLORS or q.answer in SHAPES else []
        there = names_what_is_there(q)
        if there is None or there:
            evidence += named
        else:
            absent.setdefault(q.image_id, set()).update(named)
        for value in evidence:
            kind = "color" if value in COLORS else "shape"
            if found.setdefault(kind, value) != value:
                raise ValueError(f"easy-VQA {split} image {q.image_id}: {kind} is both {found[kind]} and {value}")
    result = {}
    for image_id, found in sorted(present.items()):
        for kind, values in (("color", COLORS), ("shape", SHAPES)):
            left = [v for v in values if v not in absent.get(image_id, set())]
            if kind not in found and len(left) == 1:
                found[kind] = left[0]
            if kind in found and found[kind] not in left:
                raise ValueError(f"easy-VQA {split} image {image_id}: {kind} {found[kind]} is also said to be absent")
        if len(found) == 2:
            result[image_id] = (found["color"], found["shape"])
    return result


def image_caption(image_id: int, split: str) -> str:
    """"a red triangle"."""
    color, shape = image_attributes(split)[image_id]
    return f"a {color} {shape}"


def story_target(image_ids: list[int], split: str) -> str:
    """The answer to `STORY_PROMPT` for these images, in order:
    "Image 1: a red triangle. Image 2: a blue circle." """
    if not 1 <= len(image_ids) <= MAX_STORY_IMAGES:
        raise ValueError(f"a story has 1 to {MAX_STORY_IMAGES} images, got {len(image_ids)}")
    return " ".join(f"Image {k}: {image_caption(i, split)}." for k, i in enumerate(image_ids, start=1))


def story_sets(split: str, count: int, num_images: int, seed: int = 0) -> list[list[int]]:
    """`count` seeded sets of `num_images` distinct image ids, the benchmark's story workload."""
    import random

    rng = random.Random(seed)
    ids = sorted(image_attributes(split))
    return [rng.sample(ids, num_images) for _ in range(count)]


def vocabulary() -> list[str]:
    """Every word a question, an answer or a story target can contain, sorted; the demo
    tokenizer's vocabulary."""
    words = {w for split in SPLITS for q in load_split(split) for w in _split_words(q.question + " " + q.answer)}
    words |= set(_split_words(STORY_PROMPT.lower() + " image a an : ."))
    words |= {str(k) for k in range(1, MAX_STORY_IMAGES + 1)}
    words |= set(COLORS) | set(SHAPES)
    words |= set(CONVERSATION_WORDS)
    return sorted(words)


def _split_words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"easy-VQA split must be one of {', '.join(SPLITS)}, got {split!r}")
