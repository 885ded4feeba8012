"""`hae chat`: a conversation over images, each turn appended to the same (compressed) cache.

Questions come from a prompt on a terminal, else from `--script FILE` or stdin, one per line.
Lines that start with "/" are commands (`CHAT_COMMANDS`). A bad command or a bad image is an
`error:` line and the conversation goes on; Ctrl-C stops the answer being written and keeps
the conversation; EOF, /quit, SIGTERM or SIGHUP end it, and --json then writes every turn.
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from hae_cli.checks import os_error_message
from hae_cli.cli import signals
from hae_cli.cli.app import app, one_line
from hae_cli.cli.options import OUTPUT_PANEL, RunOptions, run_command_options
from hae_cli.cli.output import interruptible, json_only_stdout, memory_json, progress_on_stderr, write_json
from hae_cli.cli.prepare import check_run, load
from hae_cli.cli.validate import check_images
from hae_cli.errors import HaeError, InputError

CHAT_COMMANDS = {
    "/images": "/images PATH...  add images; they go into your next question's turn",
    "/reset": "/reset           forget the questions and answers; every image is fed again",
    "/stats": "/stats           the cache now: per layer, per image, memory",
    "/quit": "/quit            end the conversation (also /exit, or Ctrl-D)",
    "/help": "/help            this list",
}


@app.command(
    epilog="[bold]Examples[/bold]\n\n"
    "  [cyan]hae chat sample_images/easyvqa_test_0063.png sample_images/easyvqa_test_0198.png[/cyan]\n\n"
    "  then: [cyan]what shape is in image 1?[/cyan]  [cyan]what color is the shape in image 2?[/cyan]  "
    "[cyan]/images sample_images/easyvqa_test_0394.png[/cyan]  [cyan]which image shows a circle?[/cyan]\n\n"
    "  [cyan]printf 'what shape is in image 1?\\nis there a circle in image 2?\\n' | hae chat sample_images/easyvqa_test_0063.png sample_images/easyvqa_test_0198.png "
    "--budget 0.3[/cyan]\n\n"
    "  [cyan]hae chat sample_images/easyvqa_test_0063.png sample_images/easyvqa_test_0198.png --script sample_images/chat_questions.txt --json > turns.json[/cyan]\n\n"
    "Commands inside the chat: " + ", ".join(CHAT_COMMANDS) + ". "
    "Ctrl-C stops the answer being written (the conversation goes on); Ctrl-D ends it.",
)
@run_command_options(max_new_tokens=128)
def chat(
    images: Annotated[list[Path], typer.Argument(
        help="The images to talk about, labelled Image 1, Image 2, ... in this order.", metavar="IMAGE",
        show_default=False)],
    script: Annotated[Path | None, typer.Option(
        "--script", rich_help_panel=OUTPUT_PANEL, metavar="FILE", show_default=False,
        help="Read the questions (and /commands) from this file, one per line, instead of a prompt.",
    )] = None,
    json_output: Annotated[bool, typer.Option(
        "--json", rich_help_panel=OUTPUT_PANEL,
        help="Print only one JSON document on stdout when the conversation ends: every turn with its "
             "answer, timings, cache stats and this turn's evictions, and the cache after the images.",
    )] = False,
    no_live: Annotated[bool, typer.Option(
        "--no-live", rich_help_panel=OUTPUT_PANEL,
        help="No cache panel between turns: one line per turn on stderr instead. "
             "(Automatic when stdout is not a terminal.)",
    )] = False,
    *,
    options: RunOptions,
) -> None:
    """Talk about images: the images are encoded and compressed once, then every question and answer is appended to the same cache.

    Each answer streams as it is written; after it (on a terminal) the cache panel shows every layer's occupancy and what this turn evicted, binned and restored. Later questions can ask about what earlier ones did not: that is where eviction shows its cost.
    """
    with json_only_stdout(json_output):
        _chat(images, script, json_output, no_live, options)


def _chat(images: list[Path], script: Path | None, json_output: bool, no_live: bool, options: RunOptions) -> None:
    nothing = {"interrupted": True, "turns": [], "model": options.model} if json_output else None
    checked = check_run("chat", options, images, nothing)
    lines = _question_lines(script)
    from hae_cli.conversation import Conversation
    from hae_cli.display.memory import MemoryProbe

    stdout = Console(soft_wrap=False)
    interactive = script is None and sys.stdin.isatty()
    panels = not json_output and not no_live and stdout.is_terminal
    with progress_on_stderr() as progress:
        loaded = load(checked, options, progress, nothing)
        conversation = interruptible(lambda: Conversation(loaded, list(images), options.run_settings(checked.policy),
                                                          on_progress=progress), nothing)
        conversation.on_progress = None  # the spinner ends here; later images are read in a blink
    session = _Session(conversation, stdout, MemoryProbe(), checked.buffer, panels, json_output)
    try:
        for note in conversation.notes:
            typer.echo(f"note: {note}", err=True)
        typer.echo(_images_line(conversation), err=True)
        if interactive:
            typer.echo("Ask about them (\"what shape is in image 1?\"); /help lists the commands.", err=True)
        session.run(lines, interactive)
    finally:  # however the session ends, its record is written
        session.probe.close()
        with signals.writing_result():
            if json_output:
                payload = session.to_json()
                payload["model"] = loaded.name
                write_json(payload)
    if signals.received_ends_session():
        typer.echo(f"conversation ended{signals.describe()}", err=True)
        sys.exit(signals.exit_code())
    if session.interrupted_input:
        typer.echo("\ninterrupted", err=True)
        sys.exit(signals.exit_code())


class _CompileNotes:
    """--compile: the session's first answer compiles the decode step; say so, apart from the
    answer. A later first call (after /reset, a fresh cache) reuses the graph unless the cache's
    storage changed shape: only a real compile is said then, as a compile again."""

    def __init__(self) -> None:
        self.compiled = False

    def __call__(self, seconds: float | None) -> None:
        if seconds is None:
            if not self.compiled:
                typer.echo("\ncompiling the decode step...", err=True)
            return
        if seconds:
            again = " again (the cache's storage changed shape)" if self.compiled else ""
            typer.echo(f"compiled the decode step{again} in {seconds:.1f} s", err=True)
        self.compiled = True


class _Session:
    """The loop: read a line, run a command or ask, show the turn."""

    def __init__(self, conversation, stdout: Console, probe, buffer: int | None, panels: bool, as_json: bool) -> None:
        self.conversation, self.stdout, self.probe = conversation, stdout, probe
        self.buffer, self.panels, self.as_json = buffer, panels, as_json
        self.interrupted_input = False
        self.ended = False
        self.added: list[int] = []  # the images /images added for the next turn (their numbers)
        self.image_seconds = 0.0  # and how long reading and encoding them took
        self.compile_notes = _CompileNotes()

    def run(self, lines: Iterator[str], interactive: bool) -> None:
        """Until EOF, /quit or a signal that ends the session. A Ctrl-C outside an answer (which
        stops itself) cancels what runs at a prompt, and ends a session read from a pipe or a file."""
        while not self.ended:
            try:
                line = next(lines, None)
                if line is None:
                    return
                line = line.strip()
                if not line:
                    continue
                if line.startswith("/"):
                    self.command(line)
                else:
                    self.ask(line)
            except HaeError as error:
                typer.echo(f"error: {one_line(error)}", err=True)
            except OSError as error:
                if error.filename is None:  # stdout itself (a closed pipe, a full disk) ends the session
                    raise
                typer.echo(f"error: {one_line(os_error_message(error, error.filename, 'file'))}", err=True)
            except Exception as error:  # a bad line never ends the conversation nor loses its record
                typer.echo(f"error: {type(error).__name__}: {one_line(error)}", err=True)
            except KeyboardInterrupt:
                if interactive and not signals.received_ends_session():
                    typer.echo("\n(cancelled)", err=True)
                    continue
                self.interrupted_input = not signals.received_ends_session()
                return

    def command(self, line: str) -> None:
        name, _, rest = line.partition(" ")
        name = name.lower()
        if name in ("/quit", "/exit"):
            self.ended = True
        elif name == "/help":
            typer.echo("\n".join(CHAT_COMMANDS.values()), err=True)
        elif name == "/reset":
            self.conversation.reset()
            self.added, self.image_seconds = [], 0.0  # every image is in the prefill now
            typer.echo(f"conversation reset; {_images_line(self.conversation)}", err=True)
        elif name == "/stats":
            self.show_cache()
        elif name == "/images":
            try:
                paths = [Path(p) for p in shlex.split(rest)]
            except ValueError as error:
                raise InputError(f"/images: {error}") from None
            check_images(paths)
            first = self.conversation.num_images + 1
            began = time.perf_counter()
            self.conversation.add_images(paths)
            self.image_seconds += time.perf_counter() - began
            self.added += range(first, first + len(paths))
            where = "the first turn" if not self.conversation.turns else "your next question"
            for k, path in enumerate(paths, start=first):
                typer.echo(f"image {k}: {path} (goes into {where})", err=True)
        else:
            raise InputError(f"unknown command {name} (commands: {', '.join(CHAT_COMMANDS)})")

    def ask(self, question: str) -> None:
        streamed = False

        def on_token(piece: str) -> None:
            nonlocal streamed
            if self.as_json:
                return
            sys.stdout.write(piece.lstrip() if not streamed else piece)
            sys.stdout.flush()
            streamed = True

        with signals.answer_stops_on_signal() as stop:
            turn = self.conversation.ask(question, on_token=on_token, should_stop=stop, on_compile=self.compile_notes)
        turn.result.image_seconds, self.image_seconds = self.image_seconds, 0.0
        added, self.added = self.added, []
        if not self.as_json:
            if not streamed:
                sys.stdout.write(turn.result.text)
            sys.stdout.write("\n")
            sys.stdout.flush()
        for note in turn.result.notes:
            typer.echo(f"note: {note}", err=True)
        if stop.ends_session:
            typer.echo(f"(answer stopped{signals.describe()})", err=True)
            self.ended = True
        elif turn.result.interrupted:
            typer.echo("(answer stopped; the conversation goes on)", err=True)
        self.show_turn(turn, added)

    def show_turn(self, turn, added: list[int]) -> None:
        if self.panels:
            self.stdout.print(self._panel(turn.result, f"turn {turn.index}"))
        else:
            typer.echo(_turn_line(turn, added), err=True)

    def show_cache(self) -> None:
        from hae_cli.display.panel import PanelState, render_turn

        turns = self.conversation.turns
        if turns:
            self.stdout.print(self._panel(turns[-1].result, f"after turn {turns[-1].index}"), soft_wrap=not self.panels)
            return
        state = PanelState(title="images only", policy=self.conversation.policy, status="done",
                           stats=self.conversation.prefill_stats, memory=self.probe.snapshot(), buffer=self.buffer)
        self.stdout.print(render_turn(state), soft_wrap=not self.panels)

    def _panel(self, result, title: str):
        from hae_cli.display.panel import render_summary, render_turn, state_from_result

        state = state_from_result(result, title, self.probe.snapshot())
        state.buffer = self.buffer
        if not result.image_seconds:  # no image was read for this turn: no "images 0 ms"
            state.image_seconds = None
        return render_turn(state) if self.panels else render_summary(state)

    def to_json(self) -> dict:
        return {
            **self.conversation.to_json(),
            "notes": self.conversation.notes,
            "interrupted": self.interrupted_input or signals.received_ends_session(),
            "memory": memory_json(self.probe.snapshot()),
        }


def _images_line(conversation) -> str:
    """What the cache holds once the images are in: the prefill's compression, before any question."""
    return (f"{conversation.num_images} image(s), {conversation.prefill_tokens:,} tokens fed; after the prefill "
            f"{_cache_size(conversation.prefill_stats)}")


def _cache_size(stats) -> str:
    """"190 tokens held per layer, 760.0 KiB (71% under the full cache)"."""
    from hae_cli.units import cut_percent, format_bytes

    held = max(layer.tokens_held for layer in stats.layers)
    cut = cut_percent(stats.bytes_held, stats.full_cache_bytes)
    text = f"{held:,} tokens held per layer, {format_bytes(stats.bytes_held)} ({cut:.0f}% under the full cache)"
    if stats.host_bytes:
        text += f" + {format_bytes(stats.host_bytes)} set aside off the attention path (bin and reserve)"
    return text


def _turn_line(turn, added: list[int]) -> str:
    """One line per turn for logs: what the cache holds and what this turn did to it."""
    done = ", ".join(f"{count} {action}" for action, count in turn.actions.items() if count) or "nothing evicted"
    return f"turn {turn.index}: {_cache_size(turn.result.steps[-1])}; this turn: {done}{_added(added, turn)}"


def _added(numbers: list[int], turn) -> str:
    """"; image 3 added in 41 ms": the images read and encoded for this turn, and how long that took."""
    if not numbers:
        return ""
    plural = "s" if len(numbers) > 1 else ""
    return f"; image{plural} {', '.join(map(str, numbers))} added in {turn.result.image_seconds * 1000:.0f} ms"


def _question_lines(script: Path | None) -> Iterator[str]:
    """The lines to read: the script's (read now, so a bad file fails before the model loads),
    else stdin's, else a prompt."""
    if script is not None:
        try:
            text = script.read_bytes().decode("utf-8-sig")  # a BOM (Notepad's UTF-8) is no question
        except OSError as error:
            raise InputError(f"cannot read --script {script}: {error.strerror or error}") from None
        except UnicodeDecodeError:
            raise InputError(f"--script {script} is not UTF-8 text") from None
        if not text.strip():
            what = "it is empty" if not text else "only blank lines"
            raise InputError(f"--script {script} has no questions ({what}); write one question or /command a line")
        return iter(text.splitlines())
    if sys.stdin.isatty():
        return _prompted()
    return (line for line in sys.stdin)


def _prompted() -> Iterator[str]:
    """Lines typed at a `you> ` prompt; Ctrl-C there only clears the line (SIGTERM and SIGHUP end)."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    while True:
        try:
            yield input("you> ")
        except EOFError:
            sys.stderr.write("\n")
            return
        except KeyboardInterrupt:
            if signals.received_ends_session():
                raise
            sys.stderr.write("\n(Ctrl-C stops an answer; /quit or Ctrl-D ends the conversation)\n")
