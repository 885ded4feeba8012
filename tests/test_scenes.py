"""The scene world: what is drawn is what the questions say, labels sit where the tokens are,
the same seed gives the same bytes, and `hae eval` reads what the generator writes."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from hae_cli.evaluation.records import read_data
from hae_cli.model.phi3v.image import ImageProcessorConfig, preprocess, views_as_seen
from hae_cli.scenes import QUESTION_TYPES, make_item, make_scene, vocabulary, write_jsonl
from hae_cli.scenes.world import COLORS, GLYPH, PATCH, TAG_HALF

REPO = Path(__file__).resolve().parent.parent


def _pixels(scene) -> np.ndarray:
    return np.asarray(scene.render())


@pytest.mark.parametrize("crops", [4, 16])
def test_each_object_is_drawn_in_its_colour_with_its_digit_inside_one_patch(crops):
    rng = random.Random(crops)
    for _ in range(5):
        scene = make_scene(rng, crops, (3, 12))
        pixels = _pixels(scene)
        assert pixels.shape == (scene.side, scene.side, 3) and scene.side == 336 * int(crops ** 0.5)
        for o in scene.objects:
            x, y = o.center
            # a ring just outside the tag, inside the shape, has the object's colour
            assert tuple(pixels[y + TAG_HALF[0] + 2, x]) == COLORS[o.color], o
            rows, columns = GLYPH.shape[1:]
            glyph = pixels[y - rows // 2: y - rows // 2 + rows, x - columns // 2: x - columns // 2 + columns, 0] == 0
            assert (glyph == GLYPH[int(o.label)]).all(), o
            # the whole tag inside one 14-px patch
            top, bottom = y - TAG_HALF[0], y + TAG_HALF[0]
            left, right = x - TAG_HALF[1], x + TAG_HALF[1]
            assert top // PATCH == bottom // PATCH and left // PATCH == right // PATCH


def test_digits_are_sharp_in_the_crops_and_blurred_grey_in_the_global_view():
    """The crops show the image 1:1, so a digit's one-pixel strokes are black; the global view
    halves it, so no stroke survives at full contrast (what the label needs is in the crops)."""
    scene = make_scene(random.Random(0), 4, (12, 12))
    config = ImageProcessorConfig(num_crops=4, crop_size=336, patch_size=14)
    padded, global_view = views_as_seen(scene.render(), config)
    assert padded.size == (672, 672)
    crop, small = np.asarray(padded, dtype=float).mean(-1), np.asarray(global_view, dtype=float).mean(-1)
    for o in scene.objects:
        x, y = o.center
        assert crop[y - 3: y + 4, x - 2: x + 3].min() == 0
        gx, gy = x // 2, y // 2
        assert small[gy - 2: gy + 3, gx - 2: gx + 3].min() > 60, o
    assert preprocess(scene.render(), config).num_tokens == 757


def test_answers_follow_from_the_scene():
    for number in range(120):
        item = make_item(5, number, "chat" if number % 2 else "ask")
        for q in item.questions:
            scene = item.scenes[q.image - 1]
            words = q.question.rstrip("?").split()
            if q.type == "count":
                shape = next(s for s in ("circle", "square", "triangle", "star") if s + "s" in words)
                assert q.answer == str(len(scene.find(shape=shape)))
            elif q.type == "label":
                color, shape = words[words.index("on") + 2: words.index("on") + 4]
                assert q.answer == scene.find(color, shape)[0].label
            elif q.type == "color":
                (o,) = scene.find(shape=words[words.index("the") + 1])
                assert q.answer == o.color
            elif q.type == "shape":
                (o,) = scene.find(color=words[words.index("the") + 1])
                assert q.answer == o.shape
            elif q.type == "exist":
                color, shape = words[3:5]
                assert q.answer == ("yes" if scene.find(color, shape) else "no")
            else:
                ca, sa, relation, cb, sb = re.match(r"is the (\w+) (\w+) (.+) the (\w+) (\w+)", q.question).groups()
                (a,), (b,) = scene.find(ca, sa), scene.find(cb, sb)
                dx, dy = a.center[0] - b.center[0], a.center[1] - b.center[1]
                truth = {"left of": dx < 0, "right of": dx > 0, "above": dy < 0, "below": dy > 0}[relation]
                assert q.answer == ("yes" if truth else "no"), q
            if len(item.scenes) > 1:
                assert q.question.endswith(f" in image {q.image}?")


def test_question_types_are_dealt_evenly_and_yes_no_balanced():
    types = Counter(make_item(3, n).questions[0].type for n in range(120))
    assert types == {kind: 20 for kind in QUESTION_TYPES}
    answers = Counter(make_item(3, n).questions[0].answer for n in range(600)
                      if make_item(3, n).questions[0].type in ("exist", "spatial"))
    assert abs(answers["yes"] - answers["no"]) < 0.2 * sum(answers.values())


def test_chat_turns_move_on_to_objects_not_yet_asked_about():
    fresh = total = 0
    for number in range(40):
        item = make_item(4, number, "chat")
        assert 3 <= len(item.questions) <= 6 and 2 <= len(item.scenes) <= 4
        seen: set[str] = set()
        for q in item.questions[1:]:
            total += 1
            fresh += bool(set(q.names) - seen) or not q.names
            seen |= set(q.names)
    assert fresh / total > 0.8


def test_every_word_is_in_the_vocabulary():
    words = set(vocabulary())
    for task in ("ask", "chat", "story"):
        for number in range(30):
            item = make_item(6, number, task)
            for q in item.questions:
                text = (q.question + " " + q.answer).lower().replace("?", " ? ").replace(",", " , ")
                assert set(text.replace(".", " . ").replace(":", " : ").split()) <= words, q


def test_same_seed_same_bytes_and_hae_eval_reads_every_task(tmp_path):
    for task in ("ask", "chat", "story"):
        first = write_jsonl(tmp_path / f"{task}_a", 7, 3, task)
        second = write_jsonl(tmp_path / f"{task}_b", 7, 3, task)
        assert first.read_bytes() == second.read_bytes()
        for image in sorted((first.parent / "images").iterdir()):
            assert image.read_bytes() == (second.parent / "images" / image.name).read_bytes()
        data = read_data(first, task=task, strict=True)
        assert len(data.items) == 3 and not data.skipped
        records = [json.loads(line) for line in first.read_text().splitlines()]
        if task == "chat":
            assert [len(i.questions) for i in data.items] == [len(r["turns"]) for r in records]
        else:
            assert [i.questions[0].answers for i in data.items] == [(r["answer"],) for r in records]
    assert write_jsonl(tmp_path / "other", 8, 3, "ask").read_bytes() != (tmp_path / "ask_a" / "data.jsonl").read_bytes()


@pytest.mark.parametrize("args, says", [
    (["--items", "0"], "must be at least 1"),
    (["--items", "2", "--objects", "17"], "at most 16 objects fit a 4-crop scene"),
    (["--items", "2", "--objects", "5-3"], "1 <= MIN <= MAX"),
    (["--items", "2", "--crops", "9"], "invalid choice"),
])
def test_impossible_scenes_are_refused_in_one_line(tmp_path, args, says):
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "make_scenes.py"), "--seed", "1",
                          "--out", str(tmp_path / "out"), *args], capture_output=True, text=True)
    assert run.returncode == 2 and says in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "out" / "data.jsonl").exists()
