"""`--json` (or `--json -`) promises one JSON document on stdout and nothing else, whatever the
session does meanwhile: a chat's /stats panel, /help, an error line, /reset; a library that
prints. In-process (typer's CliRunner keeps stdout and stderr apart)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hae_cli import cli

REPO = Path(__file__).resolve().parent.parent
A = REPO / "sample_images" / "easyvqa_test_0063.png"
B = REPO / "sample_images" / "easyvqa_test_0198.png"


def only_json(result) -> dict:
    assert result.exit_code == 0, result.output[-3000:]
    assert "Traceback" not in result.output
    return json.loads(result.stdout)  # fails on anything before or after the one document


def test_chat_json_stdout_holds_the_json_whatever_the_session_does():
    lines = "/stats\n/help\n/bogus\nwhat shape is in image 1?\n/stats\n/reset\n/stats\nwhat color is the shape in image 2?\n"
    result = CliRunner().invoke(cli.app, ["chat", str(A), str(B), "-n", "3", "--json"], input=lines)
    record = only_json(result)
    assert len(record["turns"]) == 2
    assert "per layer" in result.stderr or "layer" in result.stderr  # the panels went to stderr, not nowhere


@pytest.fixture
def chatty_policy(monkeypatch):
    """A run during which something prints on stdout (as a plugin policy or a library might)."""
    from hae_cli.model import generate

    real = generate.prefill

    def prefill(*args, **kwargs):
        print("a library's own line")
        return real(*args, **kwargs)

    monkeypatch.setattr(generate, "prefill", prefill)


@pytest.mark.parametrize("args", [
    ["ask", A, "what shape is in the image?", "-n", "2", "--json"],
    ["story", A, B, "-n", "2", "--json"],
    ["chat", A, "-n", "2", "--json"],
    ["profile", "--images", A, "-q", "what shape is in the image?", "-n", "2", "--json", "-"],
], ids=["ask", "story", "chat", "profile"])
def test_anything_printed_during_a_json_run_goes_to_stderr(chatty_policy, args):
    result = CliRunner().invoke(cli.app, [str(a) for a in args], input="what shape is in image 1?\n")
    only_json(result)
    assert "a library's own line" in result.stderr


def test_eval_json_stdout_holds_the_summary_alone(chatty_policy, tmp_path):
    """Not named in the issue: hae eval --json, its notes and whatever prints meanwhile on stderr."""
    result = CliRunner().invoke(cli.app, ["eval", str(REPO / "sample_images" / "eval.jsonl"), "--out",
                                          str(tmp_path / "run"), "--policies", "", "--budgets", "thr", "--no-plot",
                                          "-n", "2", "--limit", "1", "--json"])
    assert only_json(result)["data"]["answered"] == 1
    assert "a library's own line" in result.stderr
