"""Questions about scenes, each with one right answer and its type; captions; conversations.

Types (`QUESTION_TYPES`): `color` of a shape that occurs once, `shape` of a colour that occurs
once, `label` (the digit on a named object: readable only in the crops), `count` of a shape
(0 included), `exist` (yes/no, half of each), `spatial` (is one named object left of / right of
/ above / below another, yes/no; only pairs a slot or more apart on that axis). Over several
images a question is addressed to image k ("... in image 2?").
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from hae_cli.scenes.world import COLORS, DIGITS, PLURALS, SHAPES, SLOT, Scene, SceneObject

QUESTION_TYPES = ("color", "shape", "label", "count", "exist", "spatial")
STORY_PROMPT = "Describe each image in order."
RELATIONS = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}  # (axis, sign)


@dataclass(frozen=True)
class SceneQuestion:
    """A question, its answer, its type, the image it is about (1-based) and the objects it names."""

    question: str
    answer: str
    type: str
    image: int
    names: tuple[str, ...] = ()


def ask(scene: Scene, kind: str, rng: random.Random, image: int = 1, images: int = 1,
        avoid: frozenset[str] = frozenset()) -> SceneQuestion | None:
    """A question of type `kind` about `scene`, addressed to `image` of `images`; preferring
    objects not in `avoid` (names already asked about). None when the scene has no such question
    (no shape occurs once, fewer than two objects apart, ...)."""
    make = _MAKERS[kind]
    asked = make(scene, rng, avoid)
    if asked is None:
        return None
    text, answer, names = asked
    if images > 1:
        text = text[:-1] + f" in image {image}?"
    return SceneQuestion(text, answer, kind, image, tuple(names))


def caption(scenes: list[Scene]) -> str:
    """"Image 1: red square 3, blue circle 7. Image 2: ...", objects in reading order."""
    return " ".join(f"Image {k}: " + ", ".join(f"{o.name} {o.label}" for o in s.in_reading_order()) + "."
                    for k, s in enumerate(scenes, start=1))


def vocabulary() -> list[str]:
    """Every word a scene question, answer or caption uses (for a word-level tokenizer)."""
    words = ["what", "color", "is", "the", "shape", "object", "number", "on", "how", "many", "are", "there",
             "a", "an", "yes", "no", "in", "image", "?", ",", ".", ":", *RELATIONS, *STORY_PROMPT.split(),
             *COLORS, *SHAPES, *PLURALS.values(), *DIGITS]
    return list(dict.fromkeys(w.lower() for phrase in words for w in re.findall(r"\w+|[^\w\s]", phrase)))


def _pick(rng: random.Random, options: list, avoid: frozenset[str], name=lambda o: o.name):
    fresh = [o for o in options if name(o) not in avoid]
    return rng.choice(fresh or options)


def _color(scene: Scene, rng, avoid):
    o = _only_one(scene, rng, avoid, "shape")
    return None if o is None else (f"what color is the {o.shape}?", o.color, [o.name])


def _shape(scene: Scene, rng, avoid):
    o = _only_one(scene, rng, avoid, "color")
    return None if o is None else (f"what shape is the {o.color} object?", o.shape, [o.name])


def _only_one(scene: Scene, rng, avoid, by: str) -> SceneObject | None:
    """An object whose `by` (its shape, or its colour) no other object shares, so naming it names one."""
    once = [o for o in scene.objects if len(scene.find(**{by: getattr(o, by)})) == 1]
    return _pick(rng, once, avoid) if once else None


def _label(scene: Scene, rng, avoid):
    o = _pick(rng, list(scene.objects), avoid)
    return f"what number is on the {o.name}?", o.label, [o.name]


def _count(scene: Scene, rng, avoid):
    shape = rng.choice(SHAPES)
    found = scene.find(shape=shape)
    return f"how many {PLURALS[shape]} are there?", str(len(found)), [o.name for o in found]


def _exist(scene: Scene, rng, avoid):
    present = rng.random() < 0.5
    if present:
        o = _pick(rng, list(scene.objects), avoid)
        return f"is there {_article(o.color)} {o.name}?", "yes", [o.name]
    absent = [(c, s) for c in COLORS for s in SHAPES if not scene.find(c, s)]
    color, shape = rng.choice(absent)
    return f"is there {_article(color)} {color} {shape}?", "no", []


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _spatial(scene: Scene, rng, avoid):
    relation = rng.choice(tuple(RELATIONS))
    axis, sign = RELATIONS[relation]
    pairs = [(a, b) for a in scene.objects for b in scene.objects
             if a is not b and abs(a.center[axis] - b.center[axis]) >= SLOT // 2]  # other slots on that axis
    if not pairs:
        return None
    truth = rng.random() < 0.5
    holding = [(a, b) for a, b in pairs if _holds(a, b, axis, sign) == truth]
    a, b = _pick(rng, holding, avoid, name=lambda pair: pair[0].name)
    return f"is the {a.name} {relation} the {b.name}?", "yes" if truth else "no", [a.name, b.name]


def _holds(a: SceneObject, b: SceneObject, axis: int, sign: int) -> bool:
    return (a.center[axis] - b.center[axis]) * sign > 0


_MAKERS = {"color": _color, "shape": _shape, "label": _label, "count": _count, "exist": _exist, "spatial": _spatial}
