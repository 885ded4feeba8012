"""`hae` run in-process (typer's CliRunner: stdout and stderr apart), for the checks that need
no real process: seconds faster than a subprocess each."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from typer.testing import CliRunner

from hae_cli import cli

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "sample_images"


def invoke(*args, input: str | None = None, env: dict | None = None):
    return CliRunner().invoke(cli.app, [str(a) for a in args], input=input, env=env)


def one_error(result, *fragments: str, code: int = 2) -> str:
    """The result is one `error:` line on stderr (each of `fragments` in it), exit `code`, nothing on stdout."""
    assert result.exit_code == code, (result.exit_code, result.output[-2000:])
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def hae_in_process(*args, input: str | bytes | None = None, env: dict | None = None, timeout: float | None = None,
                   **env_vars: str):
    """`hae ARGS` as `hae_process.run_hae` runs it, but in this process: the same
    `CompletedProcess` (exit code, stdout and stderr bytes), without the seconds a fresh
    interpreter spends importing torch (`timeout` is run_hae's, unused here). For what needs no
    real process; signals, pipes, a full disk, the process's own memory and start-up stay with
    `run_hae`."""
    import subprocess

    import torch

    threads = torch.get_num_threads()  # a run's --threads must not outlive it
    merged = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": None, "LINES": None, "TTY_COMPATIBLE": None,
              **(env or {}), **env_vars}
    argv = [os.fsdecode(a) if isinstance(a, (bytes, Path)) else str(a) for a in args]
    try:
        with contextlib.chdir(REPO):  # where run_hae runs it
            result = CliRunner().invoke(cli.app, argv, input=input, env=merged, prog_name="hae")
    finally:
        torch.set_num_threads(threads)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(["hae", *argv], result.exit_code, result.stdout_bytes, result.stderr_bytes)
