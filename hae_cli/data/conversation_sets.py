"""Conversations over several easy-VQA images: questions addressed to an image by its label.

The images of a conversation are shown as `story_message` shows them ("Image 2: <image>"), so
a question names its image the way a user would: easy-VQA's own wordings with "the image"
replaced by "image 2" ("does image 2 contain a circle?"), or " in image 2" added where the
wording names no image ("what color is the shape in image 2?"); and questions that ask which
image shows something ("which image shows a red shape?" -> "2"), only where exactly one does.
The demo model is trained on these (train split) and the conversation benchmark asks them
(test split); both draw them here.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from hae_cli.data import easyvqa

@dataclass(frozen=True)
class ConversationQuestion:
    """One question of a conversation, the answer, and the image (1-based label) it is about;
    `source` is the easy-VQA question about that image it was made from (for the trainer's
    probe), with the image's id."""

    question: str
    answer: str
    about: int
    source: easyvqa.Question


def addressed(question: str, k: int) -> str:
    """An easy-VQA question about one image, addressed to image `k` of several."""
    if "the image" in question:
        return question.replace("the image", f"image {k}")
    return re.sub(r"\?$", f" in image {k}?", question)


def which_image(image_ids: list[int], split: str, rng: random.Random) -> ConversationQuestion | None:
    """"which image shows a red shape?" for a colour, a shape or both that exactly one of the
    images has; None when no such thing exists."""
    attributes = easyvqa.image_attributes(split)
    kinds = [(c, None) for c in easyvqa.COLORS] + [(None, s) for s in easyvqa.SHAPES]
    kinds += [(c, s) for c in easyvqa.COLORS for s in easyvqa.SHAPES]
    unique = []
    for colour, shape in kinds:
        matches = [k for k, i in enumerate(image_ids, start=1)
                   if colour in (None, attributes[i][0]) and shape in (None, attributes[i][1])]
        if len(matches) == 1:
            unique.append((colour, shape, matches[0]))
    if not unique:
        return None
    colour, shape, k = rng.choice(unique)
    named = f"{colour} {shape}" if colour and shape else f"{colour} shape" if colour else shape
    question = f"which image shows a {named}?"
    return ConversationQuestion(question, str(k), k, easyvqa.Question(question, str(k), image_ids[k - 1]))


def conversation(image_ids: list[int], turns: int, split: str, rng: random.Random,
                 questions_of: dict[int, list[easyvqa.Question]], which_share: float = 0.2) -> list[ConversationQuestion]:
    """`turns` questions about the images, each about a random one of them (or, with
    probability `which_share`, which image shows something), drawn from `questions_of`
    (image id -> its easy-VQA questions)."""
    result = []
    while len(result) < turns:
        if rng.random() < which_share:
            turn = which_image(image_ids, split, rng)
            if turn is not None:
                result.append(turn)
                continue
        k = rng.randrange(1, len(image_ids) + 1)
        source = rng.choice(questions_of[image_ids[k - 1]])
        result.append(ConversationQuestion(addressed(source.question, k), source.answer, k, source))
    return result


def questions_by_image(split: str) -> dict[int, list[easyvqa.Question]]:
    by_image: dict[int, list[easyvqa.Question]] = {}
    for q in easyvqa.load_split(split):
        by_image.setdefault(q.image_id, []).append(q)
    return by_image


def conversation_sets(split: str, count: int, num_images: int, turns: tuple[int, int] = (4, 6),
                      seed: int = 0) -> list[tuple[list[int], list[ConversationQuestion]]]:
    """`count` seeded conversations of `num_images` distinct captioned images with
    `turns[0]`-`turns[1]` questions each: the conversation benchmark's workload."""
    rng = random.Random(seed)
    ids = sorted(easyvqa.image_attributes(split))
    by_image = questions_by_image(split)
    result = []
    for _ in range(count):
        images = rng.sample(ids, num_images)
        result.append((images, conversation(images, rng.randint(*turns), split, rng, by_image)))
    return result
