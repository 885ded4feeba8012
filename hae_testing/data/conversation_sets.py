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

from hae_testing.data import easyvqa

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


@dataclass(frozen=True)
class BatteryCase:
    """One conversation of the battery: `images` (ids), questions asked in order (`turns`, the
    last is the one under test), and what happens before the last question: "plain", "reset"
    (the turns before it, then /reset) or "added" (the last image joins with /images after
    the first turn, and the last question is about it)."""

    images: tuple[int, ...]
    turns: tuple[ConversationQuestion, ...]
    wording: str
    position: int  # the image the last question addresses (1-based)
    turn: int  # the last question's turn (1-based, counted after a reset)
    kind: str = "plain"


def wording_of(question: str) -> str:
    """An easy-VQA question with its colour and shape names replaced by <color> and <shape>."""
    text = question.lower()
    for colour in easyvqa.COLORS:
        text = re.sub(rf"\b{colour}\b", "<color>", text)
    for shape in easyvqa.SHAPES:
        text = re.sub(rf"\b{shape}\b", "<shape>", text)
    return text


def battery(split: str = "test", seed: int = 0, sizes: tuple[int, ...] = tuple(range(2, 9)),
            max_turn: int = 6) -> list[BatteryCase]:
    """Every easy-VQA wording addressed to every image position, at every turn 1..`max_turn`,
    for every image count in `sizes` (the other turns: random addressed questions), and for
    every wording and count, once after a /reset and once about an image added with /images.
    Seeded; the images and the questions' colours and shapes are drawn at random."""
    rng = random.Random(seed)
    ids = sorted(easyvqa.image_attributes(split))
    by_image = questions_by_image(split)
    by_wording: dict[str, list[easyvqa.Question]] = {}
    for q in easyvqa.load_split(split):
        by_wording.setdefault(wording_of(q.question), []).append(q)
    cases = []

    def target(wording: str, images: list[int], k: int) -> ConversationQuestion:
        choices = [q for q in by_image[images[k - 1]] if wording_of(q.question) == wording]
        if not choices:  # draw the image for this wording instead
            source = rng.choice(by_wording[wording])
            images[k - 1] = source.image_id
        else:
            source = rng.choice(choices)
        return ConversationQuestion(addressed(source.question, k), source.answer, k, source)

    def fillers(images: list[int], count: int) -> list[ConversationQuestion]:
        return conversation(images, count, split, rng, by_image, which_share=0.0)

    def distinct(wording: str, n: int, k: int) -> tuple[list[int], ConversationQuestion]:
        while True:
            images = rng.sample(ids, n)
            last = target(wording, images, k)
            if len(set(images)) == n:
                return images, last

    for wording in sorted(by_wording):
        for n in sizes:
            for k in range(1, n + 1):
                for t in range(1, max_turn + 1):
                    images, last = distinct(wording, n, k)
                    cases.append(BatteryCase(tuple(images), (*fillers(images, t - 1), last), wording, k, t))
            images, last = distinct(wording, n, rng.randint(1, n))
            cases.append(BatteryCase(tuple(images), (*fillers(images, 2), last), wording, last.about, 1, "reset"))
            images, last = distinct(wording, n, n)
            cases.append(BatteryCase(tuple(images), (*fillers(images[:-1], 1), last), wording, n, 2, "added"))
    return cases
