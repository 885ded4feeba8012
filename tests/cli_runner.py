"""`hae` run in-process (typer's CliRunner: stdout and stderr apart), for the checks that need
no real process: seconds faster than a subprocess each."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from hae_cli import cli

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "sample_images"


def invoke(*args, input: str | None = None, env: dict | None = None):
    return CliRunner().invoke(cli.app, [str(a) for a in args], input=input, env=env)


def one_error(result, *fragments: str) -> str:
    """The result is one `error:` line on stderr (each of `fragments` in it), exit 2, nothing on stdout."""
    assert result.exit_code == 2, (result.exit_code, result.output[-2000:])
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]
