"""Seeded items of the scene world (ask, chat, story), and `hae eval`'s JSONL written from them.

An item is one draw from its own random stream (`seed`, item number), so item k is the same
whatever `items` is, and the same seed gives the same bytes. Question types are dealt in turn
(shuffled every round), so every type is as common as the others.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from hae_cli.scenes.questions import QUESTION_TYPES, STORY_PROMPT, SceneQuestion, ask, caption
from hae_cli.scenes.world import Scene, make_scene, max_objects

TASKS = ("ask", "chat", "story")
DEFAULT_IMAGES = {"ask": (1, 1), "chat": (2, 4), "story": (4, 4)}
DEFAULT_OBJECTS = {"ask": (3, 12), "chat": (3, 12), "story": (3, 6)}
CHAT_TURNS = (3, 6)


@dataclass(frozen=True)
class SceneItem:
    """Scenes and what is asked of them: one question (ask), the turns (chat), a caption (story)."""

    id: str
    task: str
    scenes: tuple[Scene, ...]
    questions: tuple[SceneQuestion, ...]


def make_item(seed: int, number: int, task: str = "ask", crops: int = 4, images: tuple[int, int] | None = None,
              objects: tuple[int, int] | None = None, kinds: tuple[str, ...] = QUESTION_TYPES) -> SceneItem:
    """Item `number` of the stream `seed`."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    rng = random.Random(f"scenes/{seed}/{task}/{number}")
    low, high = images or DEFAULT_IMAGES[task]
    if not 1 <= low <= high:
        raise ValueError(f"images must be 1 <= min <= max, got {low}-{high}")
    objects = objects or _fitting(DEFAULT_OBJECTS[task], crops)
    count = rng.randint(low, high)
    scenes = tuple(make_scene(rng, crops, objects) for _ in range(count))
    item_id = f"{task}-{seed}-{number}"
    if task == "story":
        return SceneItem(item_id, task, scenes, (SceneQuestion(STORY_PROMPT, caption(list(scenes)), "caption", 0),))
    if task == "ask":
        kind = _dealt_types(seed, number, 1, kinds)[0]
        k = rng.randint(1, count)
        question = ask(scenes[k - 1], kind, rng, k, count)
        for _ in range(1000):  # no such question here (no shape occurs once, ...): a new scene
            if question is not None:
                return SceneItem(item_id, task, scenes, (question,))
            scenes = scenes[: k - 1] + (make_scene(rng, crops, objects),) + scenes[k:]
            question = ask(scenes[k - 1], kind, rng, k, count)
        raise ValueError(f"scenes of {objects[0]}-{objects[1]} objects have no {kind} question: give fewer objects")
    questions: list[SceneQuestion] = []
    touched: set[str] = set()
    deck = _dealt_types(seed, number, len(kinds), kinds)
    for turn in range(rng.randint(*CHAT_TURNS)):
        question = None
        for kind in deck[turn % len(deck):] + deck[: turn % len(deck)]:  # the turn's type, else the next
            for k in rng.sample(range(1, count + 1), count):
                question = question or ask(scenes[k - 1], kind, rng, k, count, frozenset(touched))
        touched.update(question.names)
        questions.append(question)
    return SceneItem(item_id, task, scenes, tuple(questions))


def _fitting(objects: tuple[int, int], crops: int) -> tuple[int, int]:
    most = max_objects(crops)
    return min(objects[0], most), min(objects[1], most)


def _dealt_types(seed: int, number: int, turns: int, kinds: tuple[str, ...]) -> list[str]:
    """The types of an item's questions. One question: item n takes the n-th card of a deck that
    deals every type once a round. Several (chat): the item's own shuffled deck."""
    if turns == 1:
        round_, place = divmod(number, len(kinds))
        return [_shuffled(kinds, f"scenes/{seed}/deck/{round_}")[place]]
    return _shuffled(kinds, f"scenes/{seed}/turns/{number}")


def _shuffled(kinds: tuple[str, ...], stream: str) -> list[str]:
    deck = list(kinds)
    random.Random(stream).shuffle(deck)
    return deck


def write_jsonl(out: Path, seed: int, items: int, task: str = "ask", crops: int = 4,
                images: tuple[int, int] | None = None, objects: tuple[int, int] | None = None,
                on_item=None) -> Path:
    """`out`/data.jsonl and `out`/images/: `items` items as `hae eval --task TASK` reads them,
    each record with its question types (`type`, per turn in chat) for per-type scoring."""
    if items < 1:
        raise ValueError(f"items must be at least 1, got {items}")
    make_item(seed, 0, task, crops, images, objects)  # scenes that cannot be drawn: said before anything is written
    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    path, partial = out / "data.jsonl", out / "data.jsonl.partial"
    with partial.open("w", encoding="utf-8") as file:
        for number in range(items):
            item = make_item(seed, number, task, crops, images, objects)
            names = []
            for k, scene in enumerate(item.scenes, start=1):
                name = f"images/{number:05d}_{k}.png"
                scene.render().save(out / name, optimize=False)
                names.append(name)
            file.write(json.dumps(record(item, names)) + "\n")
            if on_item is not None:
                on_item(number + 1)
    partial.replace(path)  # a run stopped half-way leaves no data.jsonl that looks whole
    return path


def record(item: SceneItem, image_names: list[str]) -> dict:
    images = {"image": image_names[0]} if len(image_names) == 1 else {"images": image_names}
    if item.task == "chat":
        turns = [{"question": q.question, "answer": q.answer, "type": q.type, "image": q.image} for q in item.questions]
        return {"id": item.id, **images, "turns": turns}
    q = item.questions[0]
    return {"id": item.id, **images, "question": q.question, "answer": q.answer, "type": q.type}
