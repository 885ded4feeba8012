"""The scenes trainer's sequences and guide targets: a target off by a few rows trains the
lookup on the wrong tokens without any error (it did: the ask trees' targets once ignored the
prompt's opening tokens), so each is checked against the scene's own geometry."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
CELL = 28  # a merged token of a 4-crop image: 28 x 28 px


@pytest.fixture(scope="module")
def data():
    sys.path.insert(0, str(SCRIPTS))
    try:
        import train_scenes_model as trainer
    finally:
        sys.path.remove(str(SCRIPTS))
    from hae_testing.checkpoints.phi3v_tokenizer import build_tiny_tokenizer
    from hae_cli.scenes import vocabulary

    tokenizer = build_tiny_tokenizer(vocabulary())
    return trainer.SceneData(tokenizer, 7), tokenizer


def _crop_cell_hits(scene, local_rows: torch.Tensor, words: set[str]) -> float:
    """The share of the crop-token targets whose cell centre lies on an object the question's
    words name (its colour or shape among them; within its radius and a cell), from the
    objects' drawn geometry alone."""
    per_row = scene.side // CELL + 1  # each crop row of tokens ends with a separator
    crop_tokens = (scene.side // CELL) * per_row
    hits = total = 0
    for local in local_rows.tolist():
        if local >= crop_tokens:
            continue  # the global view
        r, c = divmod(local, per_row)
        x, y = c * CELL + CELL / 2, r * CELL + CELL / 2
        total += 1
        hits += any({o.color, o.shape, o.shape + "s"} & words and math.dist((x, y), o.center) <= o.radius + CELL
                    for o in scene.objects)
    return hits / max(1, total)


def test_ask_tree_lookup_targets_are_the_named_objects_tokens(data):
    scene_data, tokenizer = data
    for step in range(3):
        sequence = scene_data.ask_tree(step)
        ids = sequence["ids"]
        first_slot = int((ids == -1).nonzero()[0])
        assert first_slot > 0
        for (_, rows), q_words in zip(sequence["looks"], sequence["reads"]):
            assert bool((ids[rows] == -1).all()), "a lookup target outside the image"
            words = set(tokenizer.decode(ids[q_words[1]].tolist()).split())
            if rows.numel():
                assert _crop_cell_hits(sequence["scenes"][0], rows - first_slot, words) == 1.0


def test_chat_lookup_targets_are_in_the_image_each_turn_is_about(data):
    scene_data, _ = data
    sequence = scene_data.chat(3)
    ids = sequence["ids"]
    for _, rows in sequence["looks"]:
        if rows.numel():
            images = set((-ids[rows]).tolist())
            assert len(images) == 1 and min(images) >= 1, images


def test_reads_are_each_questions_own_content_words(data):
    scene_data, tokenizer = data
    sequence = scene_data.chat(4)
    labels = sequence["labels"]
    for row, rows in sequence["reads"]:
        assert rows.numel() and int(rows.max()) <= row
        assert labels[row] != -100, "a read row is an answer row"
        assert not bool((labels[rows[0]:row] != -100).any()), "no earlier answer inside a question's span"


def test_probe_targets_are_the_one_named_objects_colour_shape_and_digit(data):
    """The answer row's probe reads what the lookup should carry: an object of the scene whose
    colour or shape the question says, for every question that names exactly one object (ask
    trees and chats)."""
    from hae_cli.scenes.world import COLORS, SHAPES

    scene_data, tokenizer = data
    for sequence in (scene_data.ask_tree(0), scene_data.ask_tree(1), scene_data.chat(2)):
        ids, reads = sequence["ids"], dict(sequence["reads"])
        assert sequence["probes"], "no question named one object"
        for row, target in sequence["probes"]:
            words = set(tokenizer.decode(ids[reads[row]].tolist()).split())
            colour, shape, digit = list(COLORS)[int(target[0])], SHAPES[int(target[1])], str(int(target[2]))
            assert {colour, shape} & words, (words, colour, shape)
            assert any((o.color, o.shape, o.label) == (colour, shape, digit)
                       for scene in sequence["scenes"] for o in scene.objects), (colour, shape, digit)
