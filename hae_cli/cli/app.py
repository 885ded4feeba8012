"""The `hae` Typer app and how it ends: every user mistake is one line `error: ...` on stderr
with exit code 2; a machine out of memory or disk space one line with exit code 1; Ctrl-C exit
code 130. A reader that closes the pipe (`hae ... | head`) has what it wanted: hae stops
quietly with exit code 0, whatever was being written."""

from __future__ import annotations

import errno
import os
import re
import sys
from typing import Annotated

import rich.console
import typer
from typer.core import TyperGroup
from typer.exceptions import TyperException

from hae_cli.cli import signals
from hae_cli.errors import HaeError

EXIT_USAGE = 2
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def one_line(message: object) -> str:
    """`message` on one line, a terminal's control characters shown escaped (a file name with an
    escape sequence cannot repaint the user's terminal)."""
    text = " ".join(str(message).split()) or "unknown error"
    return _CONTROL.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), text)


def fail(message: object, code: int = EXIT_USAGE) -> None:
    try:
        typer.echo(f"error: {one_line(message)}", err=True)
    except OSError:  # stderr itself is gone: the exit code is all there is
        pass
    sys.exit(code)


def _out_of_memory(error: BaseException) -> bool:
    if isinstance(error, MemoryError):
        return True
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if isinstance(oom, type) and isinstance(error, oom):
        return True
    if isinstance(error, OSError) and error.errno == errno.ENOMEM:
        return True
    return isinstance(error, RuntimeError) and ("can't allocate memory" in str(error) or "out of memory" in str(error))


def _out_of_memory_message(error: BaseException) -> str:
    asked = re.search(r"allocate (\d+) bytes", str(error))
    if asked:
        from hae_cli.units import format_bytes

        what = f"could not allocate {format_bytes(int(asked.group(1)))}"
    else:
        what = one_line(error)[:160]
    return (f"out of memory ({what}); try a smaller --budget, a smaller --image-option (crops, pixels, tiles), "
            "fewer images, --dtype bfloat16, or --device cpu")


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that what is still buffered cannot fail a second time at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


class _ReaderGone(Exception):
    """The reader closed stdout's pipe. Not an `OSError`, which Click would end with exit 1."""


def _reader_gone(console) -> None:
    """Rich exits with 1 when the reader closes the pipe; hae's rule is one: exit 0, quietly."""
    raise _ReaderGone()


rich.console.Console.on_broken_pipe = _reader_gone


def _hide_flag_types(command, ctx) -> None:
    """A flag takes no value, so its help row shows none (Typer would show `<bool>`)."""
    for param in [*command.params, command.get_help_option(ctx)]:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""


def _os_error(error: OSError) -> None:
    """An operating-system error no check turned into a line: the output (no file named) on a
    full disk is the machine's (exit 1); a file's is one line naming it (exit 2)."""
    from hae_cli.checks import disk_full, os_error_message

    if error.filename is None:
        _quiet_stdout()
        code = EXIT_FAILURE if disk_full(error) or error.errno == errno.EIO else EXIT_USAGE
        fail(f"cannot write the output: {error.strerror or error}", code)
    fail(os_error_message(error, os.fsdecode(error.filename), "file"), EXIT_FAILURE if disk_full(error) else EXIT_USAGE)


class _OneLineErrors(TyperGroup):
    """Runs the commands without Click's standalone handling, so that usage errors, `HaeError`s
    and out-of-memory all end as one `error:` line (exit 2, or 1 for out-of-memory)."""

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        if command is not None:
            _hide_flag_types(command, ctx)
        return command

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        for param in [*self.params, option]:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return option

    def make_context(self, info_name, args, parent=None, **extra):
        try:  # the help is printed while the arguments are parsed
            return super().make_context(info_name, args, parent, **extra)
        except BrokenPipeError:
            raise _ReaderGone() from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            raise _ReaderGone() from None

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            with signals.stop_like_ctrl_c():
                result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
                sys.stdout.flush()  # a full disk fails here, with a line, not at exit
        except TyperException as error:  # Click's errors: usage (exit 2), or `hae` alone (help)
            ctx = getattr(error, "ctx", None)
            if type(error).__name__ == "NoArgsIsHelpError":  # Typer has printed the help already
                sys.exit(EXIT_USAGE)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            fail(error.format_message() + hint, getattr(error, "exit_code", EXIT_USAGE))
        except typer.Abort:
            typer.echo(f"interrupted{signals.describe()}", err=True)
            sys.exit(signals.exit_code())
        except HaeError as error:
            fail(error, error.exit_code)
        except (_ReaderGone, BrokenPipeError):
            _quiet_stdout()
            sys.exit(0)
        except BaseException as error:
            if _out_of_memory(error):
                fail(_out_of_memory_message(error), EXIT_FAILURE)
            if isinstance(error, OSError):
                _os_error(error)
            raise
        if result == EXIT_INTERRUPTED:  # Click turned a Ctrl-C (or SIGTERM, SIGHUP) outside a run into 130
            typer.echo(f"\ninterrupted{signals.describe()}", err=True)
            result = signals.exit_code()
        if not standalone_mode:
            return result
        sys.exit(result if isinstance(result, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
    name="hae",
    help=(
        "Run a vision-language model (Phi-3.5-Vision, Qwen2-VL, LLaVA, SmolVLM, ...) with a "
        "[bold]Hierarchical Adaptive Eviction[/bold] KV cache (arXiv 2602.02197) and watch the cache at "
        "work: tokens held per layer, "
        "what was evicted, binned and restored, and the memory it saved.\n\n"
        "[bold]Examples[/bold]\n\n"
        "  [cyan]hae ask sample_images/easyvqa_test_0698.png \"what shape is in the image?\"[/cyan]\n\n"
        "  [cyan]hae ask sample_images/easyvqa_test_0416.png \"what color is the shape?\" --policy hae --budget 0.5 --visual-keep 0.4[/cyan]\n\n"
        "  [cyan]hae story sample_images/*.png --max-new-tokens 300[/cyan]\n\n"
        "  [cyan]hae chat sample_images/easyvqa_test_0063.png sample_images/easyvqa_test_0198.png[/cyan]   (ask turn after turn; the compressed cache "
        "carries over)\n\n"
        "  [cyan]hae profile --compare baseline,snapkv,h2o --json profile.json[/cyan]   (--plot FILE.png too, with "
        "pip install 'hae-cli\\[plot]')\n\n"
        "  [cyan]hae eval sample_images --limit 4[/cyan]   (every policy and budget scored on data, here the "
        "samples; --resume, --workers, --ray)\n\n"
        "  [cyan]hae policies[/cyan]   (every policy and its parameters)\n\n"
        "  [cyan]hae families[/cyan]   (the model families --model loads)\n\n"
        "The default [bold]--model demo[/bold] is a small model shipped with hae: Phi-3.5-Vision's "
        "structure and checkpoint layout, trained on easy-VQA (one coloured shape per image), so it "
        "runs offline on a CPU and answers only questions about such shapes. For the real model pass "
        "[bold]--model microsoft/Phi-3.5-vision-instruct[/bold] (from the local Hugging Face cache) "
        "or a checkpoint folder; other families (Qwen2-VL, LLaVA, SmolVLM, ...) load the same way: "
        "[bold]hae families[/bold]."
    ),
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"hae {_version()}")
        raise typer.Exit()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hae-cli")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from hae_cli import __version__

        return __version__


@app.callback()
def _options(
    show_version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True, help="Print hae's version and exit.",
    )] = False,
) -> None:
    """Options before the command."""


def main() -> None:
    """Console-script entry point (`hae`)."""
    app()
