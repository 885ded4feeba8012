"""A question the model cannot read is not answered as if it could: words the tokenizer maps to
its unknown token (any family: ids equal to `unk_token_id`), and an image number past the images
there are, are one note each, on stderr, in `--json`'s notes, in each chat turn and in hae eval's
results and summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_runner import invoke

REPO = Path(__file__).resolve().parent.parent
TEAL = REPO / "sample_images" / "easyvqa_test_0416.png"
OTHER = REPO / "sample_images" / "easyvqa_test_0063.png"



def notes(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("note: ")]


@pytest.mark.parametrize("question, fragment", [
    ("what colour is the shape?", "'colour'"),
    ("what color is the shape? \U0001F642", "'\U0001F642'"),  # an emoji
    ("what color is the shape?\u202e", "'\\u202e'"),  # shown escaped: it would turn the line around
    ("qu'est-ce que c'est?", "'qu'"),  # not named in the issue: another language
])
def test_a_word_the_tokenizer_does_not_know_is_one_note_and_in_the_json(question, fragment):
    result = invoke("ask", TEAL, question, "-n", "2", "--json")
    assert result.exit_code == 0, result.output
    said = [line for line in notes(result.stderr) if "does not know" in line]
    assert len(said) == 1 and fragment in said[0] and "<unk>" in said[0], result.stderr
    assert said[0].removeprefix("note: ") in json.loads(result.stdout)["notes"]


def test_known_words_are_no_note():
    result = invoke("ask", TEAL, "what color is the shape?", "-n", "2", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["notes"] == [] and not notes(result.stderr)


def test_an_image_number_past_the_images_is_a_note_in_ask_story_and_chat():
    asked = invoke("ask", TEAL, "what shape is in image 2?", "-n", "2")
    assert any("names image 2, but there is 1 image" in line for line in notes(asked.stderr)), asked.stderr
    told = invoke("story", TEAL, OTHER, "--prompt", "Describe image 3.", "-n", "2")  # not named in the issue
    assert any("the story prompt names image 3, but there are 2 images" in line for line in notes(told.stderr))
    chat = invoke("chat", TEAL, OTHER, "-n", "2", "--json",
                  input="what shape is in image 9?\n/images " + str(OTHER) + "\nwhat shape is in image 3?\n")
    assert chat.exit_code == 0, chat.output
    said = [line for line in notes(chat.stderr) if "names image" in line]
    assert len(said) == 1 and "names image 9, but there are 2 images" in said[0], chat.stderr  # image 3 was added
    turns = json.loads(chat.stdout)["turns"]
    assert any("names image 9" in note for note in turns[0]["notes"]) and not any(
        "names image" in note for note in turns[1]["notes"])


def test_a_chat_turn_with_an_unknown_word_says_so_and_the_chat_goes_on():
    chat = invoke("chat", TEAL, "-n", "2", input="what colour is the shape?\nwhat color is the shape?\n")
    assert chat.exit_code == 0, chat.output
    said = [line for line in notes(chat.stderr) if "does not know" in line]
    assert len(said) == 1 and "'colour'" in said[0]


def test_eval_results_and_summary_carry_the_notes(tmp_path):
    data = tmp_path / "data.jsonl"
    lines = [{"image": str(TEAL), "question": "what colour is the shape?", "answer": "teal"},
             {"image": str(TEAL), "question": "what color is the shape?", "answer": "teal"},
             {"images": [str(TEAL), str(OTHER)], "question": "what shape is in image 9?"}]
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = invoke("eval", data, "--out", tmp_path / "run", "--policies", "", "--budgets", "thr", "--no-plot")
    assert result.exit_code == 0, result.output
    stored = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert "'colour'" in stored[0]["notes"][0] and "notes" not in stored[1]
    assert any("names image 9" in note for note in stored[2]["notes"])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data"]["notes"] == stored[0]["notes"] + stored[2]["notes"]
    assert any("data.jsonl line 1" in line and "'colour'" in line for line in notes(result.stderr))


def test_the_detection_is_the_tokenizers_unk_id_for_any_tokenizer():
    """A tokenizer without offsets (a slow one) is read word by word; one without an unk token
    (byte-level: every text is readable) gives no note."""
    from hae_cli.api import unknown_pieces

    class Slow:
        unk_token_id = 0
        vocabulary = {"what": 1, "is": 2, "it?": 3}

        def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
            if return_offsets_mapping:
                raise NotImplementedError("return_offset_mapping is not available with a slow tokenizer")
            return {"input_ids": [self.vocabulary.get(word, 0) for word in text.split()]}

    assert unknown_pieces(Slow(), "what  thing is it?") == ["thing"]

    class Bytes(Slow):
        unk_token_id = None

    assert unknown_pieces(Bytes(), "what thing is it?") == []
