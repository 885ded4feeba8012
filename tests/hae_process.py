"""Running the installed `hae` command as a user does: a real process, bytes in, bytes out."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "sample_images" / "easyvqa_test_0698.png"
HAE = Path(sys.executable).with_name("hae")


def hae_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "TTY_COMPATIBLE")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **extra)
    return env


def run_hae(*args: str | bytes | Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    argv = [os.fsencode(a) if isinstance(a, Path) else a for a in args]
    return subprocess.run([HAE, *argv], capture_output=True, timeout=timeout, env=hae_env(**env), cwd=REPO)


def start_hae(*args: str | bytes | Path, **env: str) -> subprocess.Popen:
    argv = [os.fsencode(a) if isinstance(a, Path) else a for a in args]
    return subprocess.Popen([HAE, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=hae_env(**env), cwd=REPO)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str, code: int = 2) -> str:
    stderr = result.stderr.decode("utf-8", "backslashreplace")
    assert result.returncode == code, (result.returncode, stderr[-3000:])
    assert result.stdout == b"", result.stdout[:500]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]
