"""Hostile input driven through the real `hae` command in a subprocess, class by class (the
table in docs/BAD_INPUT.md): each ends as one `error:` line with exit code 2, a note, or a kept
result; never a traceback. Cheap checks fail before the model loads, so most of these take a
fraction of a second; the ones that need a run use the shipped demo model or a tiny checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from hae_process import REPO, SAMPLE, assert_one_line_error, run_hae


# ----------------------------------------------------------------------------- 1. text that is not valid Unicode


@pytest.mark.parametrize("args", [
    [b"ask", SAMPLE, b"what \xff\xfe color"],  # bytes that are not UTF-8
    [b"ask", SAMPLE, b"what \xed\xa0\x80 color"],  # a UTF-8-encoded surrogate
    [b"story", SAMPLE, b"--prompt", b"describe \xc3\x28 them"],  # a broken two-byte sequence
    [b"profile", b"--images", SAMPLE, b"--question", b"\x80what color?"],
    [b"profile", b"--images", SAMPLE, b"--images", SAMPLE, b"--task", b"story", b"-q", b"caption\xfe"],
], ids=["ask-question", "ask-surrogate-bytes", "story-prompt", "profile-question", "profile-story-prompt"])
def test_text_that_is_not_utf8_is_one_line(args):
    line = assert_one_line_error(run_hae(*args), "not valid UTF-8")
    assert "at character" in line


@pytest.mark.parametrize("entry, fragment", [
    ({"image": "a.png", "question": "what \ud800 color?"}, "entry 1 question is not valid Unicode"),
    ({"image": "a.png", "question": "what color?", "answer": "\udfff"}, "entry 1 answer is not valid Unicode"),
    ({"images": ["a.png"], "task": "story", "question": "x\udc80"}, "entry 1 question is not valid"),
])
def test_workload_file_with_lone_surrogates_is_one_line(tmp_path, entry, fragment):
    (tmp_path / "a.png").write_bytes(SAMPLE.read_bytes())
    (tmp_path / "questions.json").write_text(json.dumps([entry]), encoding="ascii")  # \ud800 escapes
    assert_one_line_error(run_hae("profile", "--samples", tmp_path), fragment)


def test_workload_file_that_is_not_utf8_is_one_line(tmp_path):
    (tmp_path / "questions.json").write_bytes(b'[{"image": "a.png", "question": "what \xff color?"}]')
    assert_one_line_error(run_hae("profile", "--samples", tmp_path), "cannot read", "questions.json")


def test_the_library_checks_the_same_text(tiny_checkpoint):
    """`api.run` (no CLI in front) refuses the same text with the same line."""
    from hae_cli import api
    from hae_cli.errors import InputError

    loaded = api.load_model(str(tiny_checkpoint))
    for task, text in (("ask", "what \udcff color"), ("story", "caption \ud800")):
        with pytest.raises(InputError, match="not valid"):
            api.run(loaded, [SAMPLE], text, task=task, max_new_tokens=1)
