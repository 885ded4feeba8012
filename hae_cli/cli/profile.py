"""`hae profile`: one workload under the full cache and other policies, side by side. Thin: check
the options, read the workload (`evaluation.records`), run it (`hae_cli.compare`, a view over
`hae_cli.evaluation`), then the table, the JSON and the pictures."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from hae_cli.cli import signals, validate
from hae_cli.checks import (
    check_output_path, check_outputs, image_inputs, kind_of, model_files, optional_extra, path_status,
)
from hae_cli.cli.app import app
from hae_cli.cli.options import OUTPUT_PANEL, KeptOptions, RunOptions, Task, run_command_options
from hae_cli.cli.output import interruptible, json_only_stdout, library, progress_on_stderr, write_json
from hae_cli.cli.prepare import LOADING_LIBRARIES
from hae_cli.cli.validate import (
    check_images, check_kept_options, check_policy_name, check_sampling, checked_policy, kept_layer_for,
)
from hae_cli.errors import ConfigError, InputError
from hae_cli.user_text import checked_text

BASELINE = "baseline"  # hae_cli.compare.BASELINE, repeated so that --help imports no torch
FULL_POLICY = "full"


def parse_compare(text: str, policy: str) -> list[tuple[str, str]]:
    """'baseline,snapkv' -> [(name, policy)]: the baseline (full cache) first, then --policy,
    then the rest, without repeats."""
    from hae_cli.cache.policies import known_policies

    registry = known_policies()
    runs = [(BASELINE, FULL_POLICY)]
    for name in [policy] + [n.strip().lower() for n in text.split(",")]:
        if not name or name in (BASELINE, FULL_POLICY):
            continue
        if name not in registry:
            raise ConfigError(f"unknown --compare name {name!r} (choose from: {BASELINE}, {', '.join(registry)})")
        if name not in [p for _, p in runs]:
            runs.append((name, name))
    return runs


def build_workload(images: Sequence[Path] | None, question: str | None, task: Task,
                   samples: Path | None, limit: int | None) -> list:
    from hae_cli.evaluation.records import Prompt, read_workload, sample_folder

    if images:
        if task == Task.story:
            prompts = [Prompt("story", tuple(images), question)]
        else:
            if question is None:
                raise InputError("--images with --task ask needs --question")
            prompts = [Prompt("ask", (image,), question) for image in images]
    else:
        if question is not None:
            raise InputError("--question needs --images (without --images the sample workload is used)")
        prompts = read_workload(samples or sample_folder())
        if task == Task.story:
            seen = list(dict.fromkeys(p for prompt in prompts for p in prompt.images))
            prompts = [Prompt("story", tuple(seen), None)]
    return prompts[:limit] if limit else prompts


def check_samples(folder: Path) -> None:
    """--samples is a folder holding questions.json, checked before the model loads."""
    status = path_status(folder, "--samples folder")
    if status is None or kind_of(status) != "folder":
        raise InputError(f"--samples: folder {folder} does not exist" if status is None
                         else f"--samples {folder} is a {kind_of(status)}; give the folder that holds questions.json")
    if path_status(folder / "questions.json", "--samples questions.json") is None:
        raise InputError(f"no questions.json in {folder}; pass --images and --question")


@app.command(
    epilog="[bold]Examples[/bold]\n\n"
    "  [cyan]hae profile[/cyan]   (the samples in sample_images/: full cache vs hae)\n\n"
    "  [cyan]hae profile --compare baseline,snapkv,h2o --budget 0.5 --json profile.json[/cyan]\n\n"
    "  [cyan]hae profile --images sample_images/easyvqa_test_0698.png --question \"what shape is in the image?\" --plot occupancy.png[/cyan]   "
    "(--plot needs matplotlib: pip install 'hae-cli\\[plot]')\n\n"
    "  [cyan]hae profile --images sample_images/easyvqa_test_0063.png --images sample_images/easyvqa_test_0198.png --task story -n 200 --budget 256[/cyan]\n\n"
    "  [cyan]hae profile --images sample_images/easyvqa_test_0698.png -q \"what shape is in the image?\" -c snapkv --show-kept kept.png[/cyan]   "
    "(kept_baseline.png, kept_hae.png, kept_snapkv.png)",
)
@run_command_options(max_new_tokens=64, kept=True)
def profile(
    compare: Annotated[str, typer.Option(
        "--compare", "-c", metavar="NAMES",
        help="Comma-separated policies to run beside --policy; [bold]baseline[/bold] is the full cache "
             "and is always run first, as the reference for agreement.",
    )] = BASELINE,
    images: Annotated[list[Path] | None, typer.Option(
        "--images", "-i", help="Use these images instead of the samples (repeat the option). "
                               "With --task ask each image is one prompt; with --task story one prompt holds all.",
    )] = None,
    question: Annotated[str | None, typer.Option("--question", "-q", help="The question (or story prompt) for --images.")] = None,
    task: Annotated[Task, typer.Option("--task", help="ask: one question per image; story: one long decode over all images.")] = Task.ask,
    samples: Annotated[Path | None, typer.Option(
        "--samples", help="Folder with questions.json and its images. Default: ./sample_images.",
    )] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Run only the first N prompts of the workload.")] = None,
    json_file: Annotated[Path | None, typer.Option(
        "--json", metavar="FILE", rich_help_panel=OUTPUT_PANEL,
        help="Also write every run and the summary as JSON to FILE ('-' for stdout, then nothing else is printed there).",
    )] = None,
    plot: Annotated[Path | None, typer.Option(
        "--plot", metavar="FILE.png", rich_help_panel=OUTPUT_PANEL,
        help="Write a PNG of the first prompt: tokens held per layer over decode steps, one line per policy "
             "(the full cache in its own panel), and bars of the tokens each policy holds of each image "
             "(needs matplotlib).",
    )] = None,
    *,
    options: RunOptions,
    kept: KeptOptions,
) -> None:
    """Run one workload under the full cache and other policies, and compare them side by side.

    One table: KV bytes final and peak, tokens kept per modality, prefill ms, decode tokens/s, eviction overhead, and agreement with the baseline (same answer, token match %, first divergence). Policy parameters (--budget, ...) apply to every policy that has them.
    """
    with json_only_stdout(json_file is not None and str(json_file) == "-"):
        check_sampling(options)
        if question is not None:
            checked_text(question, "--question")
        if plot is not None:
            check_output_path(plot, "--plot", ".png")
            optional_extra("matplotlib", "--plot", "plot")
        if json_file is not None and str(json_file) != "-":
            check_output_path(json_file, "--json")
        if samples is not None:
            check_samples(samples)
        check_kept_options(kept, options.max_new_tokens)
        with progress_on_stderr() as progress:
            progress(LOADING_LIBRARIES)
            policy_name = check_policy_name(options.policy)
            runs = parse_compare(compare, policy_name)
            built = {name: checked_policy(p, options.policy_args, strict=False) for name, p in runs}
            used = {key for name, p in runs for key in options.policy_args if key in validate.policy_fields(p)}
            unused = [key for key in options.policy_args if key not in used]
            if unused:
                raise ConfigError(f"no policy in this profile takes parameter {unused[0]!r} "
                                  f"({', '.join(p for _, p in runs)})")
            workload = build_workload(images, question, task, samples, limit)
            read = sorted({p for prompt in workload for p in prompt.images})
            check_images(read)
            inputs = image_inputs(read) + model_files(options.model)
            if not images:
                from hae_cli.evaluation.records import sample_folder

                inputs.append(("the workload", (samples or sample_folder()) / "questions.json"))
            check_outputs(_outputs(plot, json_file, kept, [name for name, _ in runs]), inputs)
            api = library()

        from hae_cli.compare import ProfileReport, run_profile
        from hae_cli.display.panel import compare_table

        nothing = ProfileReport(workload, [], {}, interrupted=True).to_json(options.model) if json_file else None
        with progress_on_stderr() as progress:
            loaded = interruptible(lambda: api.load_model(
                options.model, options.device, options.dtype, on_progress=progress,
                image_options=options.load_options()),
                nothing, json_file)
            layer = kept_layer_for(kept, loaded.num_layers) if kept.path is not None else None
            report = run_profile(
                loaded, workload, [built[name] for name, _ in runs if name != BASELINE],
                max_new_tokens=options.max_new_tokens, temperature=options.temperature, top_p=options.top_p,
                seed=options.seed, on_progress=progress, compile=options.compile,
                **(dict(show_kept=True, kept_step=kept.step) if kept.path is not None else {}),
            )
        rows = report.rows
        with signals.writing_result():
            if json_file is not None:
                write_json(report.to_json(loaded.name), json_file)
            if str(json_file) != "-":
                console = Console()
                if not console.is_terminal:  # logs: let the table take its natural width
                    console = Console(width=max(console.width, 200))
                console.print(compare_table(rows, BASELINE))
            if plot is not None:
                from hae_cli.display.plot import has_curve, plot_occupancy

                first = workload[0]
                which = f"prompt 1 of {len(workload)}" if len(workload) > 1 else "the prompt"
                drawn = {name: results[0].steps for name, results in report.results.items() if results}
                plot_occupancy(drawn, plot, title=f"tokens held per layer, {which}: {first.task} {first.label()}")
                shows = "" if has_curve(drawn) else "; the answers were too short for a curve: it shows tokens held per layer"
                typer.echo(f"plot written to {plot} ({which}: {first.task} {first.label()}{shows})", err=True)
            if kept.path is not None:
                _write_kept_per_policy(report, workload[0], kept, layer, loaded)
            notes = dict.fromkeys(note for runs in report.results.values() for result in runs for note in result.notes)
            for note in notes:
                typer.echo(f"note: {note}", err=True)
            if report.interrupted:
                typer.echo(f"interrupted{signals.describe()}: the table covers the prompts that finished under every "
                           "policy", err=True)
        if report.interrupted or signals.received():
            sys.exit(signals.exit_code())


def _outputs(plot: Path | None, json_file: Path | None, kept: KeptOptions, names: list[str]) -> list:
    """(option, path) of every file the profile writes."""
    files = [("--plot", plot), ("--json", json_file if json_file is not None and str(json_file) != "-" else None)]
    files += [("--show-kept", _kept_path(kept.path, name)) for name in names] if kept.path is not None else []
    return [(option, path) for option, path in files if path is not None]


def _kept_path(path: Path, name: str) -> Path:
    """FILE.png -> FILE_<policy>.png: one picture per policy."""
    return path.with_name(f"{path.stem}_{name}{path.suffix}")


def _write_kept_per_policy(report, prompt, kept: KeptOptions, layer: int, loaded) -> None:
    """One --show-kept PNG per policy, of the first prompt: FILE.png -> FILE_<policy>.png. A policy
    whose run ended before --kept-step is said on stderr and drawn by none."""
    from hae_cli.display.kept_png import write_run_png

    for name, results in report.results.items():
        if not results:
            continue
        path = _kept_path(kept.path, name)
        written = write_run_png(results[0], path, layer, list(prompt.images), loaded,
                                f"{name} · {prompt.task} {prompt.label()}")
        if written is None:
            last = results[0].steps[-1].step if results[0].steps else 0
            typer.echo(f"note: {name} not drawn: its run ended after decode step {last}, before --kept-step "
                       f"{kept.step}", err=True)
        else:
            typer.echo(f"kept patches of {name} written to {written}", err=True)
