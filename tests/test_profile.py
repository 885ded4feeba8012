"""The profile library: the workload file, and Ctrl-C keeping what finished."""

import json

import pytest

from hae_cli import api
from hae_cli.errors import InputError
from hae_cli.compare import BASELINE, run_profile
from hae_cli.evaluation.records import Prompt, read_workload


def test_workload_file(tmp_path):
    (tmp_path / "questions.json").write_text(json.dumps([
        {"image": "a.png", "question": "what color is the shape?", "answer": "red"},
        {"images": ["a.png", "b.png"], "task": "story"},
    ]))
    prompts = read_workload(tmp_path)
    assert prompts[0] == Prompt("ask", (tmp_path / "a.png",), "what color is the shape?", "red")
    assert prompts[1].task == "story" and prompts[1].images == (tmp_path / "a.png", tmp_path / "b.png")


@pytest.mark.parametrize("entries, fragment", [
    ([{"image": "a.png"}], "entry 1 has no question"),
    ([{"question": "q"}], "entry 1 needs an image"),
    ([{"image": "a.png", "question": "q", "task": "poem"}], "task ask or story"),
    ([], "holds no entries"),
    ({"a.png": "q"}, "expected a list"),
])
def test_bad_workload_files_name_the_problem(tmp_path, entries, fragment):
    (tmp_path / "questions.json").write_text(json.dumps(entries))
    with pytest.raises(InputError, match=fragment):
        read_workload(tmp_path)


def test_ctrl_c_keeps_the_prompts_that_finished(monkeypatch):
    calls = []

    def fake_run(loaded, images, question, *, policy, **kwargs):
        calls.append(policy.name)
        if len(calls) == 5:  # prompt 3, baseline
            raise KeyboardInterrupt
        return api.RunResult(policy.name, "red", [1, 2], {}, 0.1, 0.2, 0.0, 2)

    monkeypatch.setattr(api, "run", fake_run)
    workload = [Prompt("ask", (), f"q{i}") for i in range(4)]
    report = run_profile(None, workload, [("hae", {})])
    assert calls == ["full", "hae", "full", "hae", "full"]
    assert report.interrupted
    assert [row.name for row in report.rows] == [BASELINE, "hae"]
    assert all(row.prompts == 2 for row in report.rows)
    assert report.rows[1].same_answers == 2
