"""The `hae` Typer app and how it ends: every user mistake is one line `error: ...` on stderr
with exit code 2, out-of-memory one line with exit code 1, Ctrl-C exit code 130."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from typer.core import TyperGroup
from typer.exceptions import TyperException

from hae_cli.cli import signals
from hae_cli.errors import HaeError

EXIT_USAGE = 2
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130


def one_line(message: object) -> str:
    return " ".join(str(message).split()) or "unknown error"


def fail(message: object, code: int = EXIT_USAGE) -> None:
    typer.echo(f"error: {one_line(message)}", err=True)
    sys.exit(code)


def _out_of_memory_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [MemoryError]
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if isinstance(oom, type):
        types.append(oom)
    return tuple(types)


def _hide_flag_types(command, ctx) -> None:
    """A flag takes no value, so its help row shows none (Typer would show `<bool>`)."""
    for param in [*command.params, command.get_help_option(ctx)]:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""


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

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            with signals.stop_like_ctrl_c():
                result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
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
            fail(error, EXIT_USAGE)
        except BaseException as error:
            if isinstance(error, _out_of_memory_types()):
                fail(
                    f"out of memory ({one_line(error)[:160]}); try a smaller --budget, fewer --num-crops, "
                    "fewer images, --dtype bfloat16, or --device cpu",
                    EXIT_FAILURE,
                )
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
        "  [cyan]hae ask photo.jpg \"What is on the table?\"[/cyan]\n\n"
        "  [cyan]hae ask photo.jpg \"Describe it.\" --policy hae --budget 0.5 --visual-keep 0.4[/cyan]\n\n"
        "  [cyan]hae story p1.png p2.png p3.png --max-new-tokens 300[/cyan]\n\n"
        "  [cyan]hae chat p1.png p2.png[/cyan]   (ask turn after turn; the compressed cache carries over)\n\n"
        "  [cyan]hae profile --compare baseline,snapkv,h2o --plot occupancy.png[/cyan]\n\n"
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
