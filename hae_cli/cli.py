"""`hae`: ask about an image, tell a story over several, or profile policies side by side.

Thin on purpose: it parses and validates options, calls `hae_cli.api`, and renders with
`hae_cli.display`. Every user mistake becomes one line `error: ...` on stderr and exit code 2.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from typer.core import TyperGroup
from typer.exceptions import TyperException

from hae_cli.errors import ConfigError, HaeError, InputError

EXIT_USAGE = 2
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130
BASELINE = "baseline"  # hae_cli.profile.BASELINE, repeated so that --help imports no torch
FULL_POLICY = "full"


# ----------------------------------------------------------------------------- errors


def _one_line(message: object) -> str:
    return " ".join(str(message).split()) or "unknown error"


def _fail(message: object, code: int = EXIT_USAGE) -> None:
    typer.echo(f"error: {_one_line(message)}", err=True)
    sys.exit(code)


def _out_of_memory_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [MemoryError]
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if isinstance(oom, type):
        types.append(oom)
    return tuple(types)


class _OneLineErrors(TyperGroup):
    """Runs the commands without Click's standalone handling, so that usage errors, `HaeError`s
    and out-of-memory all end as one `error:` line (exit 2, or 1 for out-of-memory)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except TyperException as error:  # Click's errors: usage (exit 2), or `hae` alone (help)
            ctx = getattr(error, "ctx", None)
            if type(error).__name__ == "NoArgsIsHelpError" and ctx is not None:
                text = ctx.get_help()  # rich help prints itself and returns ""
                if text:
                    typer.echo(text)
                sys.exit(EXIT_USAGE)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            _fail(error.format_message() + hint, getattr(error, "exit_code", EXIT_USAGE))
        except typer.Abort:
            typer.echo("interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except HaeError as error:
            _fail(error, EXIT_USAGE)
        except BaseException as error:
            if isinstance(error, _out_of_memory_types()):
                _fail(
                    f"out of memory ({_one_line(error)[:160]}); try a smaller --budget, fewer --num-crops, "
                    "fewer images, --dtype bfloat16, or --device cpu",
                    EXIT_FAILURE,
                )
            raise
        if result == EXIT_INTERRUPTED:  # Click turned a Ctrl-C outside a run into exit 130
            typer.echo("\ninterrupted", err=True)
        if not standalone_mode:
            return result
        sys.exit(result if isinstance(result, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
    name="hae",
    help=(
        "Run [bold]Phi-3.5-Vision-Instruct[/bold] with a [bold]Hierarchical Adaptive Eviction[/bold] "
        "KV cache (arXiv 2602.02197) and watch the cache at work: tokens held per layer, "
        "what was evicted, binned and restored, and the memory it saved.\n\n"
        "[bold]Examples[/bold]\n\n"
        "  [cyan]hae ask photo.jpg \"What is on the table?\"[/cyan]\n\n"
        "  [cyan]hae ask photo.jpg \"Describe it.\" --policy hae --budget 0.5 --visual-keep 0.4[/cyan]\n\n"
        "  [cyan]hae story p1.png p2.png p3.png --max-new-tokens 300[/cyan]\n\n"
        "  [cyan]hae profile --compare baseline,snapkv,h2o --plot occupancy.png[/cyan]\n\n"
        "  [cyan]hae policies[/cyan]   (every policy and its parameters)\n\n"
        "The default [bold]--model demo[/bold] is a small model shipped with hae: Phi-3.5-Vision's "
        "structure and checkpoint layout, trained on easy-VQA (one coloured shape per image), so it "
        "runs offline on a CPU and answers only questions about such shapes. For the real model pass "
        "[bold]--model microsoft/Phi-3.5-vision-instruct[/bold] (from the local Hugging Face cache) "
        "or a checkpoint folder."
    ),
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


# ----------------------------------------------------------------------------- options

MODEL_PANEL = "Model"
POLICY_PANEL = "Cache policy"
SAMPLING_PANEL = "Generation"
OUTPUT_PANEL = "Output"

ModelOpt = Annotated[str, typer.Option(
    "--model", "-m", rich_help_panel=MODEL_PANEL, metavar="demo|FOLDER|HUB_ID",
    help="Which weights. [bold]demo[/bold] (default): a small model shipped with hae, trained on "
         "easy-VQA (coloured shapes) for trying hae offline on a CPU; it knows nothing else. A folder: a checkpoint in the official "
         "Phi-3.5-V layout. A hub id such as [bold]microsoft/Phi-3.5-vision-instruct[/bold]: "
         "taken from the local Hugging Face cache (nothing is downloaded with HF_HUB_OFFLINE=1).",
)]
DeviceOpt = Annotated[str | None, typer.Option(
    "--device", rich_help_panel=MODEL_PANEL, help="cpu, cuda or cuda:N. Default: cuda if available, else cpu.",
)]
DtypeOpt = Annotated[str | None, typer.Option(
    "--dtype", rich_help_panel=MODEL_PANEL,
    help="float32, bfloat16 or float16. Default: bfloat16 on cuda, float32 on cpu.",
)]
NumCropsOpt = Annotated[int | None, typer.Option(
    "--num-crops", min=1, rich_help_panel=MODEL_PANEL,
    help="Most 336-pixel crops per image (HD transform); fewer crops, fewer image tokens. "
         "Default: the checkpoint's (16 for single images in the official model).",
)]
PolicyOpt = Annotated[str, typer.Option(
    "--policy", "-P", rich_help_panel=POLICY_PANEL,
    help="KV-cache policy: hae, full, streaming, h2o, snapkv, fastv, mustdrop. "
         "[bold]hae policies[/bold] lists each with its parameters.",
)]
BudgetOpt = Annotated[str | None, typer.Option(
    "--budget", "-b", rich_help_panel=POLICY_PANEL, metavar="TOKENS|FRACTION",
    help="Tokens each layer may hold during decoding: a whole number ([bold]512[/bold]) or a "
         "fraction of the prompt in (0, 1] ([bold]0.5[/bold]). Default: the policy's.",
)]
VisualKeepOpt = Annotated[float | None, typer.Option(
    "--visual-keep", rich_help_panel=POLICY_PANEL, metavar="FRACTION",
    help="hae / mustdrop: keep this fraction of visual tokens at prefill (top by attention), "
         "instead of the threshold rule. Example: 0.4.",
)]
ScoreLayerOpt = Annotated[int | None, typer.Option(
    "--score-layer", rich_help_panel=POLICY_PANEL, metavar="LAYER",
    help="hae / mustdrop: the layer whose attention scores the visual tokens (0 = the first).",
)]
ParamOpt = Annotated[list[str] | None, typer.Option(
    "--param", "-p", rich_help_panel=POLICY_PANEL, metavar="NAME=VALUE",
    help="Any other policy parameter, repeatable: [bold]-p gamma=0.9 -p bin_ttl=8[/bold]. "
         "See [bold]hae policies[/bold].",
)]
MaxNewTokensOpt = Annotated[int, typer.Option(
    "--max-new-tokens", "-n", min=1, rich_help_panel=SAMPLING_PANEL, help="Most tokens to generate.",
)]
TemperatureOpt = Annotated[float, typer.Option(
    "--temperature", "-t", min=0.0, rich_help_panel=SAMPLING_PANEL, help="0 = greedy (reproducible).",
)]
TopPOpt = Annotated[float, typer.Option(
    "--top-p", rich_help_panel=SAMPLING_PANEL, help="Nucleus sampling mass in (0, 1], with --temperature > 0.",
)]
SeedOpt = Annotated[int, typer.Option("--seed", rich_help_panel=SAMPLING_PANEL, help="Sampling seed.")]
JsonFlag = Annotated[bool, typer.Option(
    "--json", rich_help_panel=OUTPUT_PANEL,
    help="Print only a JSON result on stdout: answer, timings, cache stats, eviction events.",
)]
NoLiveFlag = Annotated[bool, typer.Option(
    "--no-live", rich_help_panel=OUTPUT_PANEL,
    help="No live panel: stream the answer as plain text, then a summary. "
         "(Automatic when stdout is not a terminal.)",
)]


class Task(str, Enum):
    ask = "ask"
    story = "story"


@dataclass(frozen=True)
class RunOptions:
    model: str
    device: str | None
    dtype: str | None
    num_crops: int | None
    policy: str
    policy_args: dict[str, Any]  # as given on the command line, before matching to policies
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int


# ----------------------------------------------------------------------------- validation


def parse_budget(text: str) -> int | float:
    """'512' -> 512 tokens; '0.5' -> half the prompt. Anything else is a `ConfigError`."""
    raw = text.strip()
    if re.fullmatch(r"[+-]?\d+", raw):
        tokens = int(raw)
        if tokens <= 0:
            raise ConfigError(f"--budget must be > 0, got {text!r}")
        return tokens
    try:
        fraction = float(raw)
    except ValueError:
        raise ConfigError(
            f"--budget must be a token count (e.g. 512) or a fraction of the prompt in (0, 1] (e.g. 0.5), got {text!r}"
        ) from None
    if not math.isfinite(fraction) or fraction <= 0:
        raise ConfigError(f"--budget must be > 0, got {text!r}")
    if fraction > 1:
        raise ConfigError(
            f"--budget {text} is above 1 as a fraction; a fraction must be in (0, 1], a token count a whole number (e.g. 512)"
        )
    return fraction


def _parse_value(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "on"):
        return True
    if lowered in ("false", "no", "off"):
        return False
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def collect_policy_args(
    budget: str | None, visual_keep: float | None, score_layer: int | None, params: Sequence[str] | None
) -> dict[str, Any]:
    args: dict[str, Any] = {}
    for item in params or ():
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise ConfigError(f"--param expects NAME=VALUE, got {item!r}")
        args[name] = parse_budget(value) if name == "budget" else _parse_value(value)
    if budget is not None:
        args["budget"] = parse_budget(budget)
    if visual_keep is not None:
        args["visual_keep"] = visual_keep
    if score_layer is not None:
        args["score_layer"] = score_layer
    return args


def _policies() -> dict[str, type]:
    from hae_cli.cache.policies import POLICIES

    return POLICIES


def check_policy_name(name: str) -> str:
    policies = _policies()
    key = name.strip().lower()
    if key not in policies:
        raise ConfigError(f"unknown policy {name!r} (choose from: {', '.join(policies)})")
    return key


def policy_fields(policy: str) -> dict[str, Any]:
    import dataclasses

    cls = _policies()[policy]
    return {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}


def params_for(policy: str, args: dict[str, Any], strict: bool = True) -> dict[str, Any]:
    """The subset of `args` this policy declares, checked by building the policy once.

    `strict`: a parameter the policy does not take is an error (ask, story); otherwise it is
    skipped (profile applies one budget to every policy that has one)."""
    fields = policy_fields(policy)
    unknown = [name for name in args if name not in fields]
    if strict and unknown:
        takes = ", ".join(fields) or "no parameters"
        raise ConfigError(f"policy {policy} has no parameter {unknown[0]!r} (it takes: {takes})")
    chosen = {name: value for name, value in args.items() if name in fields}
    for name, value in chosen.items():
        _check_type(policy, name, value, fields[name].type)
    _build_policy(policy, chosen)
    return chosen


def _check_type(policy: str, name: str, value: Any, annotation: Any) -> None:
    kind = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    kind = str(kind)
    wants_number = any(t in kind for t in ("int", "float"))
    if isinstance(value, str) and "str" not in kind:
        raise ConfigError(f"{policy} parameter {name} expects {kind}, got {value!r}")
    if isinstance(value, bool) and "bool" not in kind and wants_number:
        raise ConfigError(f"{policy} parameter {name} expects {kind}, got {value!r}")
    if isinstance(value, float) and "float" not in kind and "int" in kind:
        raise ConfigError(f"{policy} parameter {name} expects a whole number, got {value!r}")


def _build_policy(policy: str, params: dict[str, Any]) -> None:
    """Let the policy validate its own parameters (one error message, in one place)."""
    try:
        _policies()[policy](**params)
    except HaeError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{policy}: {error}") from None


def check_images(images: Sequence[Path]) -> list[Path]:
    """Decode every image before the model loads, so a bad file fails in a second, not after a minute."""
    from hae_cli.model.image import load_image

    for path in images:
        load_image(path)
    return list(images)


# ----------------------------------------------------------------------------- progress


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


# ----------------------------------------------------------------------------- ask / story


def _api():
    """`hae_cli.api`, imported late (it pulls in torch), with transformers' notices silenced:
    the terminal is for the answer, the panel and one-line errors. A TRANSFORMERS_VERBOSITY
    set by the user wins."""
    import os

    from hae_cli import api

    if "TRANSFORMERS_VERBOSITY" not in os.environ:
        import transformers

        transformers.logging.set_verbosity_error()
    return api


def _run_options(**values) -> RunOptions:
    return RunOptions(
        model=values["model"],
        device=values["device"],
        dtype=values["dtype"],
        num_crops=values["num_crops"],
        policy=values["policy"],
        policy_args=collect_policy_args(values["budget"], values["visual_keep"], values["score_layer"], values["param"]),
        max_new_tokens=values["max_new_tokens"],
        temperature=values["temperature"],
        top_p=values["top_p"],
        seed=values["seed"],
    )


def _check_sampling(options: RunOptions) -> None:
    """The generation loop's own checks (max_new_tokens, temperature, top_p), before the model loads."""
    from hae_cli.model.generate import SamplingConfig

    SamplingConfig(options.max_new_tokens, options.temperature, options.top_p, options.seed)


def generate_and_show(task: str, images: Sequence[Path], question: str | None, options: RunOptions,
                      as_json: bool, live: bool) -> None:
    """Validate, load, run once, render. Exits 130 if the run was interrupted."""
    from hae_cli.display.memory import MemoryProbe
    from hae_cli.display.panel import PanelState, RunWatcher, render_panel, render_summary, state_from_result

    policy = check_policy_name(options.policy)
    params = params_for(policy, options.policy_args)
    _check_sampling(options)
    if not images:
        raise InputError(f"`{task}` needs at least one image")
    check_images(images)

    stdout = Console(soft_wrap=False)
    live = live and not as_json and stdout.is_terminal
    title = f"{task}: " + ", ".join(p.name for p in images)
    api = _api()
    with progress_on_stderr() as progress:
        loaded = api.load_model(options.model, options.device, options.dtype, options.num_crops,
                                on_progress=progress)
        progress("starting")
        probe = MemoryProbe()
        state = PanelState(title=title, policy=policy)
        watcher = RunWatcher(state, probe)
        kwargs = dict(task=task, policy=policy, policy_params=params, max_new_tokens=options.max_new_tokens,
                      temperature=options.temperature, top_p=options.top_p, seed=options.seed)
        try:
            if live:
                progress.stop()
                result = _run_live(api, loaded, images, question, kwargs, watcher, stdout)
            else:
                result = _run_plain(api, loaded, images, question, kwargs, watcher, progress, stream=not as_json)
        finally:
            memory = probe.snapshot()
            probe.close()

    if as_json:
        payload = result.to_json()
        payload["memory"] = _memory_json(memory)
        payload["model"] = loaded.name
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
    else:
        final = state_from_result(result, title, memory)
        if live:
            stdout.print(render_panel(final))
        else:
            stdout.print(render_summary(final), soft_wrap=True)
    if result.interrupted:
        typer.echo("interrupted: showing what was generated so far", err=True)
        sys.exit(EXIT_INTERRUPTED)


def _run_live(api, loaded, images, question, kwargs, watcher, stdout: Console):
    from rich.live import Live

    from hae_cli.display.panel import render_panel

    watcher.start()
    with Live(get_renderable=lambda: render_panel(watcher.state, answer_lines=6), console=stdout,
              refresh_per_second=8, transient=True, redirect_stdout=False, redirect_stderr=False):
        return _interruptible(lambda: api.run(loaded, list(images), question, on_token=watcher.on_token,
                                              on_step=watcher.on_step, on_progress=watcher.on_progress, **kwargs))


def _run_plain(api, loaded, images, question, kwargs, watcher, progress: Progress, stream: bool):
    """Stream the answer to stdout as plain text (unless JSON), progress on stderr until prefill ends."""
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
    result = _interruptible(lambda: api.run(loaded, list(images), question, on_token=on_token, on_step=on_step,
                                            on_progress=progress, **kwargs))
    progress.stop()
    if stream:
        if not started and result.text:
            sys.stdout.write(result.text)
        sys.stdout.write("\n\n")
        sys.stdout.flush()
    return result


def _interruptible(call: Callable[[], Any]) -> Any:
    """Ctrl-C before decoding starts (load, prefill) has nothing to show: say so and exit 130.
    During decoding the API itself stops and returns the partial result."""
    try:
        return call()
    except KeyboardInterrupt:
        typer.echo("\ninterrupted before any token was generated", err=True)
        sys.exit(EXIT_INTERRUPTED)


def _memory_json(memory) -> dict | None:
    from dataclasses import asdict

    return asdict(memory) if memory is not None else None


@app.command(
    epilog="[bold]Examples[/bold]\n\n"
    "  [cyan]hae ask cat.jpg \"What color is the cat?\"[/cyan]\n\n"
    "  [cyan]hae ask chart.png \"Summarise the trend.\" --budget 256 --visual-keep 0.3[/cyan]\n\n"
    "  [cyan]hae ask cat.jpg \"What is it?\" --policy h2o --budget 0.5[/cyan]\n\n"
    "  [cyan]hae ask cat.jpg \"What is it?\" --json | jq .timings[/cyan]\n\n"
    "  [cyan]hae ask cat.jpg \"What is it?\" --model microsoft/Phi-3.5-vision-instruct --device cuda[/cyan]",
)
def ask(
    image: Annotated[Path, typer.Argument(help="The image to ask about (PNG, JPEG, ...).", show_default=False)],
    question: Annotated[str, typer.Argument(help="The question, quoted.", show_default=False)],
    model: ModelOpt = "demo",
    policy: PolicyOpt = "hae",
    budget: BudgetOpt = None,
    visual_keep: VisualKeepOpt = None,
    score_layer: ScoreLayerOpt = None,
    param: ParamOpt = None,
    num_crops: NumCropsOpt = None,
    max_new_tokens: MaxNewTokensOpt = 128,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = 0,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    json_output: JsonFlag = False,
    no_live: NoLiveFlag = False,
) -> None:
    """Answer a question about one image, streaming the answer beside a live view of the cache.

    The panel shows, per layer, the tokens held (text / image / separator / generated, and the recycle bin) against the budget, the last eviction events, memory, and speed.
    """
    options = _run_options(**locals())
    if not question.strip():
        raise InputError("the question is empty")
    generate_and_show("ask", [image], question, options, json_output, live=not no_live)


@app.command(
    epilog="[bold]Examples[/bold]\n\n"
    "  [cyan]hae story p1.png p2.png p3.png[/cyan]\n\n"
    "  [cyan]hae story frames/*.jpg --prompt \"Tell a bedtime story about these pictures.\" -n 400[/cyan]\n\n"
    "  [cyan]hae story p1.png p2.png --budget 0.3 --num-crops 4[/cyan]   (small budget: watch the bin restore)",
)
def story(
    images: Annotated[list[Path] | None, typer.Argument(help="Images, in story order.", show_default=False)] = None,
    prompt: Annotated[str | None, typer.Option(
        "--prompt", rich_help_panel=SAMPLING_PANEL,
        help="The instruction after the images. Default: \"Describe each image in order.\"",
    )] = None,
    model: ModelOpt = "demo",
    policy: PolicyOpt = "hae",
    budget: BudgetOpt = None,
    visual_keep: VisualKeepOpt = None,
    score_layer: ScoreLayerOpt = None,
    param: ParamOpt = None,
    num_crops: NumCropsOpt = None,
    max_new_tokens: MaxNewTokensOpt = 256,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = 0,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    json_output: JsonFlag = False,
    no_live: NoLiveFlag = False,
) -> None:
    """Tell a story over several images, streamed with the live cache panel.

    Each image goes in after its label ("Image 1: <|image_1|>", ...), then your --prompt; a prompt that places <|image_k|> itself is used as written.

    Long decodes are where decode-time eviction works: with a tight --budget, tokens move to the recycle bin and some come back ("restored" in the events).
    """
    options = _run_options(**locals())
    if prompt is not None and not prompt.strip():
        raise InputError("--prompt is empty")
    generate_and_show("story", images or [], prompt, options, json_output, live=not no_live)


# ----------------------------------------------------------------------------- profile


def parse_compare(text: str, policy: str) -> list[tuple[str, str]]:
    """'baseline,snapkv' -> [(name, policy)]: the baseline (full cache) first, then --policy,
    then the rest, without repeats."""
    policies = _policies()
    runs = [(BASELINE, FULL_POLICY)]
    for name in [policy] + [n.strip().lower() for n in text.split(",")]:
        if not name or name in (BASELINE, FULL_POLICY):
            continue
        if name not in policies:
            raise ConfigError(f"unknown --compare name {name!r} (choose from: {BASELINE}, {', '.join(policies)})")
        if name not in [p for _, p in runs]:
            runs.append((name, name))
    return runs


def build_workload(images: Sequence[Path] | None, question: str | None, task: Task,
                   samples: Path | None, limit: int | None) -> list:
    from hae_cli.profile import Prompt, read_workload, sample_folder

    if images:
        if task == Task.story:
            prompts = [Prompt("story", tuple(images), question)]
        else:
            if not question or not question.strip():
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


@app.command(
    epilog="[bold]Examples[/bold]\n\n"
    "  [cyan]hae profile[/cyan]   (the samples in sample_images/: full cache vs hae)\n\n"
    "  [cyan]hae profile --compare baseline,snapkv,h2o --budget 0.5 --json profile.json[/cyan]\n\n"
    "  [cyan]hae profile --images cat.jpg --question \"What is it?\" --plot occupancy.png[/cyan]\n\n"
    "  [cyan]hae profile --images p1.png --images p2.png --task story -n 200 --budget 256[/cyan]",
)
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
        help="Write tokens held per layer over decode steps, one line per policy (needs matplotlib).",
    )] = None,
    model: ModelOpt = "demo",
    policy: PolicyOpt = "hae",
    budget: BudgetOpt = None,
    visual_keep: VisualKeepOpt = None,
    score_layer: ScoreLayerOpt = None,
    param: ParamOpt = None,
    num_crops: NumCropsOpt = None,
    max_new_tokens: MaxNewTokensOpt = 64,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = 0,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """Run one workload under the full cache and other policies, and compare them side by side.

    One table: KV bytes final and peak, tokens kept per modality, prefill ms, decode tokens/s, eviction overhead, and agreement with the baseline (same answer, token match %, first divergence). Policy parameters (--budget, ...) apply to every policy that has them.
    """
    from hae_cli.display.panel import compare_table
    from hae_cli.profile import run_profile

    options = _run_options(**locals())
    policy_name = check_policy_name(options.policy)
    runs = parse_compare(compare, policy_name)
    params = {name: params_for(p, options.policy_args, strict=False) for name, p in runs}
    used = {key for chosen in params.values() for key in chosen}
    unused = [key for key in options.policy_args if key not in used]
    if unused:
        raise ConfigError(f"no policy in this profile takes parameter {unused[0]!r} ({', '.join(p for _, p in runs)})")
    _check_sampling(options)
    workload = build_workload(images, question, task, samples, limit)
    check_images(sorted({p for prompt in workload for p in prompt.images}))
    if plot is not None and plot.suffix.lower() != ".png":
        raise ConfigError(f"--plot writes a PNG; give a file name that ends in .png, got {str(plot)!r}")
    for option, path in (("--plot", plot), ("--json", json_file)):
        if path is not None and str(path) != "-" and not path.parent.is_dir():
            raise ConfigError(f"{option} {path}: folder {str(path.parent)!r} does not exist")

    api = _api()
    with progress_on_stderr() as progress:
        loaded = _interruptible(lambda: api.load_model(
            options.model, options.device, options.dtype, options.num_crops, on_progress=progress))
        report = run_profile(
            loaded, workload, [(policy_key, params[name]) for name, policy_key in runs if name != BASELINE],
            max_new_tokens=options.max_new_tokens, temperature=options.temperature, top_p=options.top_p,
            seed=options.seed, on_progress=progress,
        )
    rows = report.rows

    if json_file is not None:
        text = json.dumps(report.to_json(loaded.name), indent=2) + "\n"
        if str(json_file) == "-":
            sys.stdout.write(text)
        else:
            try:
                json_file.write_text(text, encoding="utf-8")
            except OSError as error:
                raise InputError(f"cannot write {json_file}: {error.strerror or error}") from None
    if str(json_file) != "-":
        console = Console()
        if not console.is_terminal:  # logs: let the table take its natural width
            console = Console(width=max(console.width, 200))
        console.print(compare_table(rows, BASELINE))
    if plot is not None:
        from hae_cli.display.plot import plot_occupancy

        first = workload[0]
        plot_occupancy({name: results[0].steps for name, results in report.results.items() if results}, plot,
                       title=f"tokens held per layer: {first.task} {first.label()}")
        typer.echo(f"plot written to {plot}", err=True)
    if report.interrupted:
        typer.echo("interrupted: the table covers the prompts that finished under every policy", err=True)
        sys.exit(EXIT_INTERRUPTED)


# ----------------------------------------------------------------------------- policies


@app.command("policies")
def list_policies() -> None:
    """List the cache policies and their parameters (with defaults), as --policy and -p NAME=VALUE take them.

    Example: [cyan]hae ask cat.jpg "What is it?" --policy streaming --budget 256 -p sink=8[/cyan]
    """
    from rich.table import Table

    table = Table(header_style="bold", show_lines=True)
    table.add_column("policy", style="bold cyan", no_wrap=True)
    table.add_column("what it does")
    table.add_column("parameters (default)")
    for name, cls in _policies().items():
        doc = (cls.__doc__ or "").strip().split("\n\n")[0]
        fields = policy_fields(name).values()
        params = "\n".join(f"{f.name} = {_default(f)}" for f in fields) or "-"
        table.add_row(name, " ".join(doc.split()), params)
    Console().print(table)


def _default(field) -> str:
    import dataclasses

    if field.default is not dataclasses.MISSING:
        return repr(field.default)
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(field.default_factory())  # type: ignore[misc]
    return "(required)"


def main() -> None:
    """Console-script entry point (`hae`)."""
    app()


if __name__ == "__main__":
    main()
