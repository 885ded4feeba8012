"""Settings that say what they mean: a parameter given twice is refused, a number Python reads
but hae cannot use is named as it is ('inf', 'nan', '1_000', 1e400), the option named is the
one the user wrote, a file with a UTF-8 byte-order mark is read. All before the model loads, so
in-process (typer's CliRunner)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_runner import invoke, one_error

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "sample_images" / "easyvqa_test_0698.png"




@pytest.mark.parametrize("command", [["ask", SAMPLE, "what color?"], ["story", SAMPLE], ["chat", SAMPLE],
                                     ["profile"]])
@pytest.mark.parametrize("args, fragments", [
    (["--policy", "h2o", "-p", "budget=0.3", "--budget", "0.5"], ["budget is given twice", "-p budget=0.3",
                                                                   "--budget 0.5"]),
    (["-p", "budget=0.3", "-p", "budget=0.4"], ["budget is given twice"]),  # not named in the issue
    (["--visual-keep", "0.4", "-p", "visual-keep=0.3"], ["visual_keep is given twice"]),  # not named
    (["--score-layer", "1", "-p", "score_layer=2"], ["score_layer is given twice"]),  # not named
], ids=["budget-and-p", "p-twice", "visual-keep", "score-layer"])
def test_a_parameter_given_twice_is_refused_naming_both(command, args, fragments):
    one_error(invoke(*command, *args), *fragments)


@pytest.mark.parametrize("args, fragments, wrong", [
    (["--budget", "inf"], ["--budget must be a finite number", "'inf'"], "> 0"),
    (["--budget", "1e400"], ["--budget 1e400 is too large"], "> 0"),
    (["--budget", "nan"], ["--budget must be a finite number"], "> 0"),  # not named in the issue
    (["--budget", "1_000"], ["without '_'", "1000"], "above 1"),
    (["--policy", "streaming", "-p", "budget=nan"], ["-p budget must be a finite number"], "--budget"),
    (["-p", "budget=-inf"], ["-p budget must be a finite number"], "--budget"),  # not named
    (["-p", "gamma=nan"], ["-p gamma must be a number", "'nan'"], None),  # not named: accepted before
    (["-t", "nan"], ["--temperature must be a finite number >= 0", "nan"], "should be"),
    (["-t", "inf"], ["--temperature must be a finite number"], None),  # not named: accepted before
])
def test_a_number_hae_cannot_use_is_named_as_it_is(args, fragments, wrong):
    line = one_error(invoke("ask", SAMPLE, "what color?", *args), *fragments)
    if wrong is not None:
        assert wrong not in line.removeprefix("error: -p budget"), line


@pytest.mark.parametrize("args, fragments", [
    (["--setting", "full"], ["--setting full: the full cache always runs"]),
    (["--setting", "h2o:budget=0.3", "--setting", "h2o:budget=0.3"], ["twice by --setting"]),
    (["--budgets", "0.4,0.4"], ["'hae vk0.4' is given twice by --budgets"]),  # not named
    (["--budgets", "0.4:visual_keep=0.3"], ["visual_keep is given twice"]),  # not named: 0.3 won silently
    (["--setting", "h2o:budget=0.3:budget=0.4"], ["budget is given twice"]),  # not named
    (["--setting", "h2o:budget=inf"], ["budget must be a finite number"]),  # not named
], ids=["full", "setting-twice", "budgets-twice", "visual-keep-twice", "param-twice", "inf"])
def test_eval_settings_given_twice_say_where_each_came_from(args, fragments, tmp_path):
    one_error(invoke("eval", REPO / "sample_images", "--out", tmp_path / "run", *args), *fragments)


def test_a_ray_address_is_named_as_written(tmp_path):
    pytest.importorskip("ray")
    line = one_error(invoke("eval", REPO / "sample_images", "--out", tmp_path / "run", "--ray", "127.0.0.1:1"),
                     "--ray 127.0.0.1:1")
    assert "answers at 127.0.0.1:1" in line


def test_files_with_a_utf8_byte_order_mark_are_read(tmp_path):
    """Notepad's UTF-8: a JSONL, a JSON list and a chat --script are read, not refused."""
    from hae_cli.evaluation.records import read_data, read_workload

    record = {"image": str(SAMPLE), "question": "what color is the shape?", "answer": "teal"}
    lines = tmp_path / "bom.jsonl"
    lines.write_bytes(b"\xef\xbb\xbf" + json.dumps(record).encode() + b"\n")
    listed = tmp_path / "questions.json"
    listed.write_bytes(b"\xef\xbb\xbf" + json.dumps([record]).encode())
    for path in (lines, listed):
        assert [item.questions[0].text for item in read_data(path).items] == ["what color is the shape?"]
    assert read_workload(tmp_path)[0].question == "what color is the shape?"
    from hae_cli.cli.chat import _question_lines

    script = tmp_path / "q.txt"
    script.write_bytes(b"\xef\xbb\xbfwhat shape is in image 1?\n")
    assert list(_question_lines(script)) == ["what shape is in image 1?"]


def test_every_json_result_records_the_policy_and_the_parameters_it_ran_with():
    """What ran, not what was asked for: every parameter, the defaults and a budget capped at the
    context included (ask, story, chat; profile's runs are the same RunResult)."""
    asked = invoke("ask", SAMPLE, "what color is the shape?", "--policy", "h2o", "--budget", "99999999", "-n", "2",
                   "--json")
    assert asked.exit_code == 0, asked.output
    payload = json.loads(asked.stdout)
    assert payload["policy"] == "h2o"
    assert payload["policy_params"] == {"budget": 4096, "recent": None, "buffer": 0}
    chat = invoke("chat", SAMPLE, "-p", "buffer=8", "-n", "2", "--json", input="what shape is in image 1?\n")
    assert chat.exit_code == 0, chat.output
    record = json.loads(chat.stdout)
    assert record["policy_params"]["buffer"] == 8 and "gamma" in record["policy_params"]
    assert record["turns"][0]["policy_params"] == record["policy_params"]


def test_a_missing_optional_extra_is_said_before_the_model_loads(monkeypatch, tmp_path):
    """profile --plot without matplotlib ran the whole profile, then failed."""
    import sys

    from hae_cli import api

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    monkeypatch.setattr(api, "load_model", no_load)
    one_error(invoke("profile", "--images", SAMPLE, "-q", "what shape is in the image?", "--plot",
                     tmp_path / "p.png"), "--plot needs matplotlib", "pip install 'hae-cli[plot]'")
