"""`hae eval`: policies and budgets scored on the user's own data, resumable, on this machine's
processes or a Ray cluster. Thin: check the options and read the data before anything loads,
then `hae_cli.evaluation.evaluate`, then the table."""

from __future__ import annotations

import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from hae_cli.cli import signals, validate
from hae_cli.cli.app import app
from hae_cli.cli.options import (
    OUTPUT_PANEL, POLICY_PANEL, DeviceOpt, DtypeOpt, ImageOptionOpt, ModelOpt, NumCropsOpt, image_options,
)
from hae_cli.cli.output import json_only_stdout, library, progress_on_stderr, write_json
from hae_cli.cli.prepare import LOADING_LIBRARIES
from hae_cli.errors import ConfigError, InputError

DATA_PANEL = "Data"
RUN_PANEL = "Where it runs"
DEFAULT_BUDGETS = "thr,0.6,0.4,0.25"
DEFAULT_POLICIES = "fastv,snapkv,h2o,streaming,mustdrop,random"
DEFAULT_MAX_NEW_TOKENS = {"ask": 16, "story": 128, "chat": 16}
NOTES_SHOWN = 10  # skipped records and failed items listed on stderr; the rest counted


def ColumnOpt(flag: str, what: str, default: str):  # noqa: N802 (an annotation, as options.py names them)
    """A --*-column option: the key (column) `what` is read from."""
    return Annotated[str | None, typer.Option(flag, rich_help_panel=DATA_PANEL, metavar="NAME",
                                              help=f"Read {what} from this key (column). Default: {default}.")]


class EvalTask(str, Enum):
    ask = "ask"
    story = "story"
    chat = "chat"


@app.command(
    "eval",
    epilog="[bold]Examples[/bold]\n\n"
    "  [cyan]hae eval sample_images --limit 4[/cyan]   (the --samples folder: every policy at HAE's KV, "
    "4 HAE settings)\n\n"
    "  [cyan]hae eval sample_images/eval.jsonl --policies snapkv,h2o --budgets thr,0.4 --out runs/a[/cyan]\n\n"
    "  [cyan]hae eval sample_images/eval.jsonl --out runs/a --resume[/cyan]   (after Ctrl-C, a kill or a crash: "
    "continues where it stopped)\n\n"
    "  [cyan]hae eval sample_images/eval.jsonl --setting h2o:budget=0.3 --setting hae:budget=0.3:buffer=8 "
    "--policies \"\" --budgets \"\"[/cyan]   (each policy at parameters of its own)\n\n"
    "  [cyan]hae eval my_dataset/ --split validation --question-column query --answer-column label[/cyan]   "
    "(a datasets folder written by save_to_disk)\n\n"
    "  [cyan]hae eval sample_images/chat.jsonl --task chat --workers 2[/cyan]   (two local processes, a model "
    "each)\n\n"
    "  [cyan]hae eval sample_images/eval.jsonl --model Qwen/Qwen2-VL-2B-Instruct --ray auto[/cyan]   (Ray actors on a "
    "running cluster: one per GPU)\n\n"
    "A JSONL record (sample_images/eval.jsonl): [cyan]{\"id\": \"q1\", \"image\": \"easyvqa_test_0416.png\", "
    "\"question\": \"what color is the shape?\", \"answers\": [\"teal\"]}[/cyan]; [bold]images[/bold] for several, [bold]choices[/bold] for a "
    "multiple choice (the answer: a letter), [bold]turns[/bold] for --task chat; no answer: scored by "
    "agreement with the full cache. Writes OUT/results.jsonl (one line per item, as it finishes), "
    "OUT/summary.json and OUT/accuracy.png.",
)
def eval_command(
    data: Annotated[Path, typer.Argument(
        metavar="DATA", show_default=False,
        help="A .jsonl or .json file of records (image paths relative to it), a folder with questions.json "
             "(hae profile --samples), or a folder a datasets Dataset was saved to (save_to_disk).")],
    task: Annotated[EvalTask, typer.Option(
        "--task", help="ask: one question per record; story: the images captioned (the record's question is "
                       "the instruction); chat: the record's turns asked one after another into one cache.",
    )] = EvalTask.ask,
    policies: Annotated[str, typer.Option(
        "--policies", rich_help_panel=POLICY_PANEL, metavar="NAMES",
        help="Policies run at HAE's KV on each item: snapkv / h2o / streaming / random get the tokens per layer HAE "
             "held after prefill, mustdrop as many image tokens, fastv the same share of image tokens dropped "
             "after its layer --fastv-layer. The full cache (the reference) and hae always run. \"\" for none.",
    )] = DEFAULT_POLICIES,
    budgets: Annotated[str, typer.Option(
        "--budgets", rich_help_panel=POLICY_PANEL, metavar="SETTINGS",
        help="HAE's settings, each a share of image tokens it keeps at prefill ([bold]0.4[/bold]) or "
             "[bold]thr[/bold] (its own thresholds), with parameters after colons "
             "([bold]0.4:budget=0.3:buffer=8[/bold]); every policy of --policies is matched to each.",
    )] = DEFAULT_BUDGETS,
    setting: Annotated[list[str] | None, typer.Option(
        "--setting", rich_help_panel=POLICY_PANEL, metavar="POLICY[:NAME=VALUE...]",
        help="A policy at parameters of its own, repeatable: [bold]--setting h2o:budget=0.3[/bold]. "
             "hae policies lists every parameter.",
    )] = None,
    fewer_crops: Annotated[str, typer.Option(
        "--fewer-crops", rich_help_panel=POLICY_PANEL, metavar="N[,N]",
        help="Also run the full cache with the images read at N crops each (Phi-3.5-V; e.g. 1 for 4-crop "
             "images): fewer pixels instead of fewer tokens, each at its own KV, the first baseline a user "
             "asks for.",
    )] = "",
    fastv_layer: Annotated[int, typer.Option(
        "--fastv-layer", min=1, rich_help_panel=POLICY_PANEL, help="FastV's K: its first K layers keep the "
                                                                   "whole prompt.",
    )] = 2,
    limit: Annotated[int | None, typer.Option(
        "--limit", min=1, rich_help_panel=DATA_PANEL, help="Only the first N usable records.")] = None,
    strict: Annotated[bool, typer.Option(
        "--strict", rich_help_panel=DATA_PANEL,
        help="Refuse the run at the first record that cannot be used, instead of skipping it with a note.",
    )] = False,
    split: Annotated[str | None, typer.Option(
        "--split", rich_help_panel=DATA_PANEL,
        help="The split of a saved DatasetDict. Default: test, or the only one.")] = None,
    id_column: ColumnOpt("--id-column", "the id", "id (else the record's number, from 0)") = None,
    image_column: ColumnOpt("--image-column", "the images (paths, or a datasets Image)", "image or images") = None,
    question_column: ColumnOpt("--question-column", "the question", "question") = None,
    answer_column: ColumnOpt("--answer-column", "the references", "answer or answers") = None,
    choices_column: ColumnOpt("--choices-column", "a multiple choice's options", "choices") = None,
    turns_column: ColumnOpt("--turns-column", "a conversation's turns (--task chat)", "turns") = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", rich_help_panel=OUTPUT_PANEL, metavar="DIR",
        help="Where the results go. Default: ./hae-eval-NAME, NAME the data's.")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", rich_help_panel=OUTPUT_PANEL,
        help="Continue the run in --out: only the items without a result run, and the summary covers them "
             "all. Refused if --out holds a run of other options or other data.",
    )] = False,
    target_drop: Annotated[float, typer.Option(
        "--target-drop", min=0.0, rich_help_panel=OUTPUT_PANEL, metavar="POINTS",
        help="The accuracy loss (points against the full cache) the summary's best HAE setting may have.",
    )] = 1.0,
    json_output: Annotated[bool, typer.Option(
        "--json", rich_help_panel=OUTPUT_PANEL, help="Print the summary as JSON on stdout instead of the tables.",
    )] = False,
    no_plot: Annotated[bool, typer.Option("--no-plot", rich_help_panel=OUTPUT_PANEL,
                                          help="No accuracy.png.")] = False,
    quiet: Annotated[bool, typer.Option(
        "--quiet", rich_help_panel=OUTPUT_PANEL, help="No progress bar (there is none when stderr is not a "
                                                      "terminal).")] = False,
    workers: Annotated[int | None, typer.Option(
        "--workers", "-w", min=1, rich_help_panel=RUN_PANEL,
        help="Processes, each with the model loaded once, fed one item at a time. Default: 1 (in this "
             "process); with --ray, as many as the cluster has room for (a GPU, or --threads CPUs, each).",
    )] = None,
    threads: Annotated[int, typer.Option(
        "--threads", min=1, rich_help_panel=RUN_PANEL,
        help="Torch threads per worker. Default: 1 (on a machine with idle cores, raise it or --workers). "
             "Answers are the same at a given thread count, whichever backend runs them.",
    )] = 1,
    ray: Annotated[str | None, typer.Option(
        "--ray", rich_help_panel=RUN_PANEL, metavar="ADDRESS",
        help="Run on Ray actors (pip install 'hae-cli\\[ray]'): [bold]auto[/bold] joins the cluster this "
             "machine belongs to (ray start), an address (HOST:PORT or ray://HOST:10001) a remote one, "
             "[bold]local[/bold] starts one here for the run.",
    )] = None,
    max_new_tokens: Annotated[int | None, typer.Option(
        "--max-new-tokens", "-n", min=1, rich_help_panel="Generation",
        help="Most tokens per answer (greedy). Default: 16 for ask and chat, 128 for story.",
    )] = None,
    model: ModelOpt = "demo",
    num_crops: NumCropsOpt = None,
    image_option: ImageOptionOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """Score policies and budgets on your own data: accuracy, KV cut and speed per setting, each baseline at HAE's KV on the same item.

    Every item is answered greedily under the full cache, each HAE setting (--budgets), each policy of --policies given the KV HAE held on that item, and each --setting. An answer is scored against the record's references (VQA's normalised exact match: case, punctuation, articles, number words), as the letter of a multiple choice, or, with no reference, by agreement with the full cache. Each item's result is appended to OUT/results.jsonl as it finishes: a stopped run continues with --resume and sums to the same summary.
    """
    with json_only_stdout(json_output):
        from hae_cli.evaluation.records import Columns, read_data

        if ray is not None:
            from hae_cli.evaluation.parallel import check_ray

            check_ray(ray)
        columns = Columns(id_column, image_column, question_column, answer_column, choices_column, turns_column)
        loaded_data = read_data(data, task.value, columns, split, strict, limit)
        _notes([f"skipped {line}" for line in loaded_data.skipped], "records skipped")
        out = out if out is not None else Path(f"hae-eval-{data.stem or data.resolve().name}")
        with progress_on_stderr() as spinner:
            spinner(LOADING_LIBRARIES)
            plan = build_plan(policies, budgets, setting or [], fastv_layer, fewer_crops)
            library()
        from hae_cli.evaluation.evaluate import evaluate
        from hae_cli.evaluation.parallel import Backend
        from hae_cli.evaluation.runner import EvalConfig

        config = EvalConfig(model=_model_name(model), device=device, dtype=dtype, num_crops=num_crops,
                            task=task.value, plan=tuple(plan), fastv_layer=fastv_layer,
                            max_new_tokens=max_new_tokens or DEFAULT_MAX_NEW_TOKENS[task.value],
                            image_options=tuple(sorted(image_options(image_option).items())))
        backend = Backend(workers, threads, ray)
        plot = not no_plot and _can_plot()
        bar = _Bar(enabled=not quiet, description=f"items on {backend.describe()}")
        here = ray is None and (workers or 1) == 1
        try:
            report = evaluate(loaded_data, config, out, backend=backend, resume=resume, target_drop=target_drop,
                              plot=plot, loaded=(lambda: _load_here(config, bar)) if here else None,
                              on_result=bar.advance, on_backend=bar.backend)
        finally:
            bar.stop()
        _report(report, json_output, config)


def build_plan(policies: str, budgets: str, settings: list[str], fastv_layer: int, fewer_crops: str = "") -> list:
    """full, HAE at each of --budgets, each of --policies matched to each, each --setting, the full
    cache at each of --fewer-crops: every policy and parameter checked (built once) before the
    model loads."""
    from hae_cli.evaluation.evaluate import plan_of
    from hae_cli.evaluation.matching import Setting, can_be_matched, fewer_crops_settings, parse_list, parse_params

    baselines = [validate.check_policy_name(name) for name in parse_list(policies)]
    baselines = list(dict.fromkeys(b for b in baselines if b not in ("hae", "full")))
    for baseline in baselines:
        if not can_be_matched(baseline):
            raise ConfigError(f"--policies: {baseline} has no budget to match HAE's KV with; run it at parameters "
                              f"of its own with --setting {baseline}:NAME=VALUE")
    if baselines and not parse_list(budgets):
        raise ConfigError("--policies run at HAE's KV on each item: give HAE's settings with --budgets "
                          "(or --policies \"\" and each policy's parameters with --setting)")
    for part in parse_list(budgets):
        head, *options = part.split(":")
        if head != "thr" and not _fraction(head):
            raise ConfigError(f"--budgets: {head!r} is neither thr nor a fraction of image tokens in (0, 1] "
                              "(e.g. 0.4)")
        validate.checked_policy("hae", parse_params(":".join(options), sep=":"))
    own = []
    for text in settings:
        name, *options = text.split(":")
        policy = validate.check_policy_name(name)
        params = parse_params(":".join(options), sep=":")
        validate.checked_policy(policy, params)
        own.append(Setting(" ".join([policy, *options]), policy, params))
    plan = plan_of(budgets, baselines, own)
    _check_given_once(plan, len(own))
    plan += fewer_crops_settings(_crop_counts(fewer_crops))
    if "fastv" in baselines:
        validate.checked_policy("fastv", {"prune_layer": fastv_layer})
    return plan


def _crop_counts(text: str) -> list[int]:
    from hae_cli.evaluation.matching import parse_list

    counts = []
    for part in parse_list(text):
        if not part.isdigit() or int(part) < 1:
            raise ConfigError(f"--fewer-crops: {part!r} is not a crop count (a whole number >= 1, e.g. 1)")
        if int(part) in counts:
            raise ConfigError(f"--fewer-crops: {int(part)} is given twice; give it once")
        counts.append(int(part))
    return counts


def _check_given_once(plan: list, settings: int) -> None:
    """No setting runs twice; the message says where each copy came from (the full cache is
    always in the plan, as the reference)."""
    origin = ["the full cache, always run" if s.policy == "full" and s.matched_to is None and i == 0
              else "--budgets" if s.policy == "hae" and s.matched_to is None else "--policies x --budgets"
              for i, s in enumerate(plan[: len(plan) - settings])] + ["--setting"] * settings
    seen: dict[str, str] = {}
    for setting, where in zip(plan, origin):
        if setting.label not in seen:
            seen[setting.label] = where
            continue
        first = seen[setting.label]
        if first.startswith("the full cache"):
            raise ConfigError(f"--setting {setting.label}: the full cache always runs (it is the reference every "
                              "setting is compared with); drop this --setting")
        both = f"twice by {where}" if first == where else f"by {first} and again by {where}"
        raise ConfigError(f"the setting {setting.label!r} is given {both}; give it once")


def _fraction(text: str) -> bool:
    try:
        return 0 < float(text) <= 1
    except ValueError:
        return False


def _model_name(model: str) -> str:
    """A checkpoint folder as an absolute path: a worker may start elsewhere (a Ray actor does)."""
    from hae_cli.model.loading import SHIPPED_MODELS

    path = Path(model).expanduser()
    return str(path.resolve()) if model not in SHIPPED_MODELS and path.is_dir() else model


def _can_plot() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        typer.echo("note: matplotlib is not installed, so no accuracy.png (pip install 'hae-cli[plot]')", err=True)
        return False
    return True


def _load_here(config, bar):
    """One worker, in this process: the model loads here, with the spinner."""
    from hae_cli.api import load_model

    with progress_on_stderr(enabled=bar.enabled) as spinner:
        return load_model(config.model, config.device, config.dtype, config.num_crops, on_progress=spinner,
                          image_options=dict(config.image_options))


class _Bar:
    """A Rich progress bar on stderr: items done, the rate, the time left. None when stderr is
    not a terminal, or with --quiet."""

    def __init__(self, enabled: bool, description: str = "items") -> None:
        self.console = Console(stderr=True)
        self.description = description
        self.enabled = enabled and self.console.is_terminal
        self._progress = self._task = None
        self._started = 0.0
        self._first = 0

    def start(self, total: int, done: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TextColumn("left"), TimeRemainingColumn(),
            console=self.console, transient=True)
        self._progress.start()
        self._task = self._progress.add_task(self.description, total=total, completed=done, rate="")

    def backend(self, backend, note: str | None) -> None:
        """The backend as it runs (its workers capped): the bar names it; the cap is a note."""
        self.description = f"items on {backend.describe()}"
        if note is not None:
            typer.echo(f"note: {note}", err=True)

    def advance(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self._progress is None:  # the first call: what was there before this run
            self.start(total, done)
            self._first, self._started = done, time.perf_counter()
        elapsed = time.perf_counter() - self._started
        rate = (done - self._first) / elapsed if elapsed > 0 else 0.0
        shown = f"{rate:.2f} items/s" if rate >= 0.1 else f"{1 / rate:.0f} s/item" if rate > 0 else ""
        self._progress.update(self._task, completed=done, rate=shown)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _notes(lines: list[str], what: str) -> None:
    for line in lines[:NOTES_SHOWN]:
        typer.echo(f"note: {line}", err=True)
    if len(lines) > NOTES_SHOWN:
        typer.echo(f"note: ... and {len(lines) - NOTES_SHOWN} more {what}", err=True)


def _report(report, as_json: bool, config) -> None:
    """The tables (or the JSON) on stdout; what was written, skipped or failed on stderr."""
    from hae_cli.evaluation.summary import (
        EQUAL_KV_CAPTION, ROW_COLUMNS, best_line, by_type_table, equal_kv_table, rich_table, table_rows,
    )

    with signals.writing_result():
        _notes([f"item failed: {line}" for line in report.errors], "items failed")
        _notes(report.notes, "notes on what the model cannot read (summary.json: data.notes)")
        if report.interrupted:
            typer.echo(f"interrupted{signals.describe()}: {report.done} of {report.total} items have results in "
                       f"{report.out}; run the same command with --resume to continue", err=True)
            sys.exit(signals.exit_code())
        summary = report.summary
        if summary is None:
            raise InputError(f"no item could be run ({len(report.errors)} failed): {report.errors[0]}")
        if as_json:
            write_json(summary)
        else:
            console = Console()
            if not console.is_terminal:
                console = Console(width=max(console.width, 160))
            data = summary["data"]
            console.print(rich_table(
                f"{Path(data['source']).name}: {data['answered']} items, {summary['rows'][0]['questions']} "
                f"questions, task {config.task}, model {config.model}", ROW_COLUMNS, table_rows(summary["rows"]),
                caption="accuracy: exact match after VQA normalisation, the option chosen, or the full cache's "
                        "answer where a record has no reference; KV: bytes held after every step, cut against the "
                        "full cache on the same items"))
            typed = by_type_table(summary["rows"])
            if typed is not None:
                console.print(rich_table("accuracy % by question type (questions)", *typed))
            baselines = list(dict.fromkeys(s.policy for s in config.plan if s.matched_to is not None))
            if summary["equal_kv"]:
                columns, rows = equal_kv_table(summary["equal_kv"], baselines)
                console.print(rich_table("accuracy % at HAE's KV bytes", columns, rows, EQUAL_KV_CAPTION))
            best = summary["best_hae"]
            if best is not None:
                console.print(best_line(best, summary["target_drop_points"]))
        for warning in summary["warnings"]:
            typer.echo(f"note: {warning}", err=True)
        run = summary["run"]
        plot = f", {report.plot.name}" if report.plot is not None else ""
        typer.echo(f"{report.done} item{'' if report.done == 1 else 's'} ({run['resumed_items']} from before, {run['items_run']} run now in "
                   f"{run['seconds']:.1f} s, {run['items_per_second']:.2f} items/s on {run['backend']}); "
                   f"results in {report.out}/: results.jsonl, summary.json{plot}", err=True)
