"""What --compile reports is true: a decode speed counts only the steps after the compiled
step's first call (which compiles, or finds its graph, and pays for more than a step), so a
one-token answer has no speed rather than 4 tok/s; a chat says it compiles once, not again after
/reset when the graph is reused. The compiler is replaced by the same step run eagerly with a
slow first call: the point is the bookkeeping, not torch.compile (tests/test_compiled_step.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parent.parent
TEAL = REPO / "sample_images" / "easyvqa_test_0416.png"
SLOW_FIRST_CALL = 0.4


@pytest.fixture
def slow_first_compile(monkeypatch):
    from hae_cli.model import compiled
    from hae_cli.model.decoder import static_decode_step

    calls = []

    def function(mode, backend="inductor"):
        def step(*args):
            if not calls:
                time.sleep(SLOW_FIRST_CALL)  # as a compile
            calls.append(1)
            return static_decode_step(*args)
        return step

    monkeypatch.setattr(compiled, "compiled_step_function", function)
    return calls


def test_a_one_token_compiled_answer_has_no_speed(demo, slow_first_compile):
    from hae_cli.api import run

    result = run(demo, [TEAL], "what color is the shape?", compile=True)
    assert result.decode_tokens == 1 and slow_first_compile  # one token, fed through the compiled step
    assert result.tokens_per_second == 0.0 and result.to_json()["timings"]["decode_tokens_timed"] == 0


def test_a_compiled_speed_counts_the_steps_after_the_first_call(demo, slow_first_compile):
    from hae_cli.api import run

    result = run(demo, [TEAL, TEAL], None, task="story", max_new_tokens=8, compile=True)
    assert result.decode_tokens == 8
    assert result.timed_tokens == 7 and result.decode_seconds < SLOW_FIRST_CALL
    eager = run(demo, [TEAL, TEAL], None, task="story", max_new_tokens=8)
    assert eager.timed_tokens is None and eager.speed_tokens == 8


def test_a_chat_says_it_compiles_once_not_again_after_reset(slow_first_compile):
    from hae_cli import cli

    result = CliRunner().invoke(cli.app, ["chat", str(TEAL), "--compile", "-n", "3"],
                                input="what shape is in image 1?\n/reset\nwhat shape is in image 1?\n")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("compiling the decode step") == 1, result.stderr
    assert len(slow_first_compile) >= 2  # both conversations decoded through the step
