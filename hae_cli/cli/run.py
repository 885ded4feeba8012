"""`hae ask` and `hae story`: one run under one policy, streamed with the live cache panel
(or as plain text, or as one JSON document)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from hae_cli.checks import check_outputs, image_inputs, model_files
from hae_cli.cli import signals
from hae_cli.cli.app import app
from hae_cli.cli.options import (
    NO_KEPT, SAMPLING_PANEL, JsonFlag, KeptOptions, NoLiveFlag, RunOptions, run_command_options,
)
from hae_cli.cli.output import (
    Progress, interruptible, json_only_stdout, memory_json, progress_on_stderr, write_json,
)
from hae_cli.cli.prepare import check_run, load
from hae_cli.cli.validate import check_kept_options, kept_layer_for
from hae_cli.errors import InputError
from hae_cli.user_text import checked_text


@app.command(
    epilog="[bold]Examples[/bold]\n\n"
    "  [cyan]hae ask sample_images/easyvqa_test_0416.png \"what color is the shape?\"[/cyan]\n\n"
    "  [cyan]hae ask sample_images/easyvqa_test_0698.png \"what shape is in the image?\" --budget 256 --visual-keep 0.3[/cyan]\n\n"
    "  [cyan]hae ask sample_images/easyvqa_test_0416.png \"what color is the shape?\" --policy h2o --budget 0.5[/cyan]\n\n"
    "  [cyan]hae ask sample_images/easyvqa_test_0416.png \"what color is the shape?\" --json | jq .timings[/cyan]\n\n"
    "  [cyan]hae ask sample_images/easyvqa_test_0698.png \"what shape is in the image?\" --show-kept kept.png --kept-layer 0[/cyan]   "
    "(the patches each layer still holds)\n\n"
    "  [cyan]hae ask sample_images/easyvqa_test_0698.png \"What is in the picture?\" --model microsoft/Phi-3.5-vision-instruct "
    "--device cuda[/cyan]   (the real model, from the local Hugging Face cache)",
)
@run_command_options(max_new_tokens=128, kept=True)
def ask(
    image: Annotated[Path, typer.Argument(help="The image to ask about (PNG, JPEG, ...).", metavar="IMAGE",
                                          show_default=False)],
    question: Annotated[str, typer.Argument(help="The question, quoted.", metavar="QUESTION", show_default=False)],
    json_output: JsonFlag = False,
    no_live: NoLiveFlag = False,
    *,
    options: RunOptions,
    kept: KeptOptions,
) -> None:
    """Answer a question about one image, streaming the answer beside a live view of the cache.

    The panel shows, per layer, the tokens held (text / image / separator / generated, and the recycle bin) against the budget, the last eviction events, memory, and speed.
    """
    checked_text(question, "the question")
    with json_only_stdout(json_output):
        generate_and_show("ask", [image], question, options, json_output, live=not no_live, kept=kept)


@app.command(
    epilog="[bold]Examples[/bold]\n\n"
    "  [cyan]hae story sample_images/easyvqa_test_0063.png sample_images/easyvqa_test_0198.png sample_images/easyvqa_test_0394.png[/cyan]\n\n"
    "  [cyan]hae story sample_images/*.png --prompt \"Describe each image in order.\" -n 400[/cyan]\n\n"
    "  [cyan]hae story sample_images/easyvqa_test_0698.png sample_images/easyvqa_test_0416.png "
    "sample_images/easyvqa_test_0394.png sample_images/easyvqa_test_0063.png --budget 200 -p buffer=8[/cyan]   "
    "(a tight budget: watch tokens go to the bin and come back, \"restored\")",
)
@run_command_options(max_new_tokens=256, kept=True)
def story(
    images: Annotated[list[Path], typer.Argument(help="Images, in story order.", metavar="IMAGE", show_default=False)],
    prompt: Annotated[str | None, typer.Option(
        "--prompt", rich_help_panel=SAMPLING_PANEL,
        help="The instruction after the images. Default: \"Describe each image in order.\"",
    )] = None,
    json_output: JsonFlag = False,
    no_live: NoLiveFlag = False,
    *,
    options: RunOptions,
    kept: KeptOptions,
) -> None:
    """Tell a story over several images, streamed with the live cache panel.

    Each image goes in after its label ("Image 1: " and the image, as the model's chat template writes an image: Phi-3.5-V's <|image_1|>, Qwen's <|vision_start|>...), then your --prompt. With Phi-3.5-V, a prompt that places <|image_k|> itself is used as written.

    Long decodes are where decode-time eviction works: with a tight --budget, tokens move to the recycle bin and some come back ("restored" in the events).
    """
    if prompt is not None:
        checked_text(prompt, "--prompt")
    with json_only_stdout(json_output):
        generate_and_show("story", images, prompt, options, json_output, live=not no_live, kept=kept)



# ----------------------------------------------------------------------------- running


def generate_and_show(task: str, images: Sequence[Path], question: str | None, options: RunOptions,
                      as_json: bool, live: bool, kept: KeptOptions = NO_KEPT) -> None:
    """Validate, load, run once, render. Exits 128 + the signal (130: Ctrl-C) if the run was interrupted."""
    check_kept_options(kept, options.max_new_tokens)
    if kept.path is not None:
        check_outputs([("--show-kept", kept.path)], image_inputs(images) + model_files(options.model))
    # Under --json, an interruption before any token still leaves one JSON document on stdout.
    nothing = {"interrupted": True, "text": "", "token_ids": [], "model": options.model} if as_json else None
    checked = check_run(task, options, images, nothing)
    from hae_cli.display.kept_png import write_run_png
    from hae_cli.display.memory import MemoryProbe
    from hae_cli.display.panel import PanelState, RunWatcher, render_final, render_summary, state_from_result

    stdout = Console(soft_wrap=False)
    live = live and not as_json and stdout.is_terminal
    title = f"{task}: " + ", ".join(p.name for p in images)
    policy = checked.policy
    with progress_on_stderr() as progress:
        loaded = load(checked, options, progress, nothing)
        kept_layer = kept_layer_for(kept, loaded.num_layers) if kept.path is not None else None
        progress("starting")
        probe = MemoryProbe()
        state = PanelState(title=title, policy=policy.name, buffer=checked.buffer)
        watcher = RunWatcher(state, probe)
        kwargs = dict(task=task, settings=options.run_settings(policy), on_compile=watcher.on_compile)
        if kept.path is not None:
            kwargs.update(show_kept=True, kept_step=kept.step)
        api = checked.api
        try:
            if live:
                progress.stop()
                result = _run_live(api, loaded, images, question, kwargs, watcher, stdout)
            else:
                result = _run_plain(api, loaded, images, question, kwargs, watcher, progress, nothing)
        finally:
            memory = probe.snapshot()
            probe.close()

    drawn = write_run_png(result, kept.path, kept_layer, images, loaded, f"{policy.name} · {title}")
    with signals.writing_result():
        if drawn is not None:
            when = "after prefill" if result.kept.step == 0 else f"after decode step {result.kept.step}"
            typer.echo(f"kept patches written to {drawn} (layer {kept_layer}, {when})", err=True)
        if as_json:
            payload = result.to_json()
            if drawn is not None:
                payload["kept"]["drawn"] = {"layer": kept_layer, "path": str(kept.path)}
            payload["memory"] = memory_json(memory)
            payload["model"] = loaded.name
            write_json(payload)
        else:
            final = state_from_result(result, title, memory)
            final.buffer = checked.buffer
            if live:
                stdout.print(render_final(final))
            else:
                stdout.print(render_summary(final), soft_wrap=True)
        for note in result.notes:
            typer.echo(f"note: {note}", err=True)
        if result.interrupted:
            typer.echo(f"interrupted{signals.describe()}: showing what was generated so far", err=True)
    if result.interrupted or signals.received():
        sys.exit(signals.exit_code())
    if kept.path is not None and drawn is None:
        last = result.steps[-1].step if result.steps else 0
        raise InputError(f"--kept-step {kept.step} is beyond the run: it ended after decode step {last} "
                         f"(0 = after prefill); {kept.path} was not written")


def _run_live(api, loaded, images, question, kwargs, watcher, stdout: Console):
    from rich.live import Live

    from hae_cli.display.panel import LivePanel

    watcher.start()
    with Live(get_renderable=lambda: LivePanel(watcher.state), console=stdout,
              refresh_per_second=8, transient=True, redirect_stdout=False, redirect_stderr=False):
        return interruptible(lambda: api.run(loaded, list(images), question, on_token=watcher.on_token,
                                             on_step=watcher.on_step, on_progress=watcher.on_progress,
                                             on_prefill=watcher.on_prefill, **kwargs))


def _run_plain(api, loaded, images, question, kwargs, watcher, progress: Progress, json_payload: dict | None):
    """Stream the answer to stdout as plain text (unless JSON), progress on stderr until prefill ends."""
    stream = json_payload is None
    started = False

    def on_step(stats) -> None:
        watcher.on_step(stats)
        progress.stop()

    def on_token(piece: str) -> None:
        nonlocal started
        watcher.on_token(piece)
        if stream:
            progress.stop()
            sys.stdout.write(piece)
            sys.stdout.flush()
            started = True

    watcher.start()
    result = interruptible(lambda: api.run(loaded, list(images), question, on_token=on_token, on_step=on_step,
                                           on_progress=progress, on_prefill=watcher.on_prefill, **kwargs),
                           json_payload)
    progress.stop()
    if stream:
        if not started and result.text:
            sys.stdout.write(result.text)
        sys.stdout.write("\n\n")
        sys.stdout.flush()
    return result
