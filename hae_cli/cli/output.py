"""What the commands write besides the answer: a transient spinner on stderr while the model
loads, the library imported with transformers' notices off, JSON documents."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console

from hae_cli.cli.app import EXIT_INTERRUPTED


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
    return api


def interruptible(call: Callable[[], Any]) -> Any:
    """Ctrl-C before decoding starts (load, prefill) has nothing to show: say so and exit 130.
    During decoding the API itself stops and returns the partial result."""
    try:
        return call()
    except KeyboardInterrupt:
        typer.echo("\ninterrupted before any token was generated", err=True)
        sys.exit(EXIT_INTERRUPTED)


def memory_json(memory) -> dict | None:
    from dataclasses import asdict

    return asdict(memory) if memory is not None else None


def json_text(payload: dict) -> str:
    return json.dumps(payload, indent=2) + "\n"
