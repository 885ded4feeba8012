"""What the commands write besides the answer: a transient spinner on stderr while the model
loads, the library imported with transformers' notices off, JSON documents."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from hae_cli.checks import write_failed
from hae_cli.cli import signals


class Progress:
    """A spinner on stderr while the model loads and the prompt prefills; transient, so that
    stderr keeps only results and errors. Silent when stderr is not a terminal (pipes, CI)."""

    def __init__(self, console: Console, enabled: bool = True):
        self.console = console
        self.enabled = enabled and console.is_terminal
        self._status = None

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        if self._status is None:
            self._status = self.console.status(message, spinner="dots")
            self._status.start()
        else:
            self._status.update(message)

    def stop(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None


@contextmanager
def progress_on_stderr(enabled: bool = True):
    progress = Progress(Console(stderr=True), enabled)
    try:
        yield progress
    finally:
        progress.stop()


def library():
    """`hae_cli.api`, imported late (it pulls in torch), with transformers' notices silenced:
    the terminal is for the answer, the panel and one-line errors. A TRANSFORMERS_VERBOSITY
    set by the user wins."""
    import os

    from hae_cli import api

    if "TRANSFORMERS_VERBOSITY" not in os.environ:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()  # "Loading weights": hae shows its own progress
    return api


def interruptible(call: Callable[[], Any], json_payload: dict | None = None, json_path: Path | None = None) -> Any:
    """Ctrl-C (or SIGTERM, SIGHUP) before decoding starts (load, prefill) has nothing to show:
    say so and exit 128 + the signal. Under --json the output still holds one JSON document,
    `json_payload` (with `"interrupted": true`). During decoding the API itself stops and
    returns the partial result."""
    try:
        return call()
    except KeyboardInterrupt:
        with signals.writing_result():
            if json_payload is not None:
                write_json(json_payload, json_path)
            typer.echo(f"\ninterrupted{signals.describe()} before any token was generated", err=True)
        sys.exit(signals.exit_code())


def memory_json(memory) -> dict | None:
    from dataclasses import asdict

    return asdict(memory) if memory is not None else None


_json_stdout: list = []  # the real stdout while `json_only_stdout` holds it for the JSON document


@contextmanager
def json_only_stdout(enabled: bool = True):
    """Under --json (or --json -), stdout holds one JSON document and nothing else, whatever the
    run does meanwhile (a chat's /stats panel, a library's print): everything else written to
    stdout goes to stderr until `write_json` writes the document to the real stdout."""
    if not enabled:
        yield
        return
    real = sys.stdout
    _json_stdout.append(real)
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        if sys.stdout is sys.stderr:
            sys.stdout = real
        _json_stdout.remove(real)


def write_json(payload: dict, path: Path | None = None) -> None:
    """One JSON document to stdout (`path` None or '-') or to a file."""
    text = json.dumps(payload, indent=2) + "\n"
    if path is None or str(path) == "-":
        out = _json_stdout[-1] if _json_stdout else sys.stdout
        out.write(text)
        out.flush()
        return
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as error:
        raise write_failed(error, path) from None
