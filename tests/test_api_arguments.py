"""The Python API refuses an argument of the wrong kind in one `HaeError` line, before anything
runs: a callback that is not a function (a bare TypeError deep in the run before), a flag that
is not True or False ('yes' was taken as True), a decode step below 0 (taken, drawing nothing)."""

from __future__ import annotations

from pathlib import Path

import pytest

SAMPLE = Path(__file__).resolve().parent.parent / "sample_images" / "easyvqa_test_0698.png"


def calls(demo):
    from hae_cli import api
    from hae_cli.conversation import Conversation

    def run(**kwargs):
        return lambda: api.run(demo, [SAMPLE], "what color is the shape?", max_new_tokens=2, **kwargs)

    def prepared(**kwargs):
        return lambda: api.run_prepared(demo, api.prepare(demo, [SAMPLE], "what color?"), max_new_tokens=2, **kwargs)

    def asked(**kwargs):
        return lambda: Conversation(demo, [SAMPLE], max_new_tokens=2).ask("what shape is in image 1?", **kwargs)

    return {
        "on_token=5": (run(on_token=5), "on_token must be a function"),
        "on_step='x'": (run(on_step="x"), "on_step must be a function"),
        "on_progress=1": (run(on_progress=1), "on_progress must be a function"),  # not named in the issue
        "on_prefill=[]": (run(on_prefill=[]), "on_prefill must be a function"),  # not named
        "kept_step=-1": (run(show_kept=True, kept_step=-1), "kept_step must be a decode step"),
        "kept_step=1.5": (run(show_kept=True, kept_step=1.5), "kept_step must be a decode step"),  # not named
        "compile='yes'": (run(compile="yes"), "compile must be True or False"),
        "show_kept=1": (run(show_kept=1), "show_kept must be True or False"),  # not named
        "run_prepared on_token": (prepared(on_token=5), "on_token must be a function"),
        "prepare on_progress": (lambda: api.prepare(demo, [SAMPLE], "q", on_progress="x"), "on_progress"),
        "Conversation compile": (lambda: Conversation(demo, [SAMPLE], compile="yes"), "compile must be True"),
        "ask on_token": (asked(on_token=5), "on_token must be a function"),
        "ask should_stop": (asked(should_stop=True), "should_stop must be a function"),
        "an unknown setting": (run(max_tokens=3), "unknown run setting 'max_tokens'"),
        "settings of another kind": (lambda: api.run(demo, [SAMPLE], "q", {"policy": "full"}), "settings must be a RunSettings"),
        "Conversation unknown setting": (lambda: Conversation(demo, [SAMPLE], budget=3), "unknown run setting 'budget'"),
        "RunSettings bad sampling": (run(settings=api.RunSettings(top_p=0)), "top_p must be in (0, 1]"),
    }


@pytest.mark.parametrize("case", list(calls(None)))
def test_an_argument_of_the_wrong_kind_is_one_hae_error_line(demo, case):
    from hae_cli.errors import HaeError

    call, fragment = calls(demo)[case]
    with pytest.raises(HaeError) as raised:
        call()
    assert fragment in str(raised.value) and "\n" not in str(raised.value), str(raised.value)


def test_right_kinds_still_run(demo):
    from hae_cli import api

    pieces = []
    result = api.run(demo, [SAMPLE], "what color is the shape?", max_new_tokens=2, on_token=pieces.append,
                     show_kept=True, kept_step=0, compile=False)
    assert result.text and pieces and result.kept is not None


def test_one_settings_object_gives_what_its_fields_as_keywords_give(demo):
    """`RunSettings` is the run's one configuration; keywords over it win, field by field."""
    from hae_cli import api
    from hae_cli.conversation import Conversation

    settings = api.RunSettings(policy="snapkv", policy_params={"budget": 40}, max_new_tokens=6)
    by_object = api.run(demo, [SAMPLE], "what color is the shape?", settings)
    by_keywords = api.run(demo, [SAMPLE], "what color is the shape?", policy="snapkv", policy_params={"budget": 40},
                          max_new_tokens=6)
    assert by_object.token_ids == by_keywords.token_ids and by_object.policy == "snapkv"
    assert [s.bytes_held for s in by_object.steps] == [s.bytes_held for s in by_keywords.steps]
    shorter = api.run(demo, [SAMPLE], "what color is the shape?", settings, max_new_tokens=2)
    assert shorter.token_ids == by_object.token_ids[:2]
    chat = Conversation(demo, [SAMPLE], settings, max_new_tokens=3)
    assert chat.policy == "snapkv" and chat.sampling.max_new_tokens == 3
