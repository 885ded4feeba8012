"""The options every run command shares (`ask`, `story`, `chat`, `profile`), declared once.

`@run_command_options(...)` adds them to a Typer command's signature (which is its help) and
hands them to the command as one object: `options: RunOptions` (and, with `kept=True`,
`kept: KeptOptions`). A command declares only what is its own.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from hae_cli.cli.validate import collect_policy_args
from hae_cli.errors import ConfigError

MODEL_PANEL = "Model"
POLICY_PANEL = "Cache policy"
SAMPLING_PANEL = "Generation"
OUTPUT_PANEL = "Output"

ModelOpt = Annotated[str, typer.Option(
    "--model", "-m", rich_help_panel=MODEL_PANEL, metavar="demo|FOLDER|HUB_ID",
    help="Which weights. [bold]demo[/bold] (default): a small model shipped with hae, trained on "
         "easy-VQA (coloured shapes) for trying hae offline on a CPU; it knows nothing else. A folder, or a hub id "
         "such as [bold]microsoft/Phi-3.5-vision-instruct[/bold] or [bold]Qwen/Qwen2-VL-2B-Instruct[/bold] taken "
         "from the local Hugging Face cache (nothing is downloaded with HF_HUB_OFFLINE=1), of any family "
         "[bold]hae families[/bold] lists.",
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
    help="Phi-3.5-Vision: most 336-pixel crops per image (HD transform; the same as --image-option num_crops=N). "
         "The image is resized, up or down, to tile into at most this many, and each crop adds 144 image tokens "
         "to the global view's 144: more crops, more image tokens, even for a small image. Default: the "
         "checkpoint's; at most what it was trained with (demo model: 1, Phi-3.5-Vision: 16).",
)]
ImageOptionOpt = Annotated[list[str] | None, typer.Option(
    "--image-option", rich_help_panel=MODEL_PANEL, metavar="NAME=N",
    help="The model family's own image resolution setting, repeatable: Phi-3.5-V's num_crops, Qwen-VL's "
         "max_pixels, InternVL's max_tiles, Mistral 3's longest_edge, Gemma 3's pan_and_scan_crops "
         "([bold]hae families[/bold] lists each family's). A family without that option says so in one line.",
)]
PolicyOpt = Annotated[str, typer.Option(
    "--policy", rich_help_panel=POLICY_PANEL, metavar="NAME",
    help="KV-cache policy: [bold]hae[/bold] (default), [bold]full[/bold] (no eviction) or a baseline; "
         "[bold]hae policies[/bold] lists every policy there is, with its parameters.",
)]
BudgetOpt = Annotated[str | None, typer.Option(
    "--budget", "-b", rich_help_panel=POLICY_PANEL, metavar="TOKENS|FRACTION",
    help="Tokens each layer is brought back to while decoding: a whole number counts tokens ([bold]512[/bold]; "
         "[bold]1[/bold] keeps one token per layer), a number with a point is a share of the prompt in (0, 1] "
         "([bold]0.5[/bold] keeps half; [bold]1.0[/bold] keeps all of it). A budget that leaves fewer than "
         "16 tokens per layer is said in a note. A layer holds up to budget + the policy's buffer "
         "([bold]-p buffer=N[/bold]) before a round evicts it back to the budget. Default: the policy's.",
)]
VisualKeepOpt = Annotated[float | None, typer.Option(
    "--visual-keep", rich_help_panel=POLICY_PANEL, metavar="FRACTION",
    help="hae / mustdrop: keep this fraction of visual tokens at prefill (top by attention), "
         "instead of the threshold rule. Example: 0.4.",
)]
ScoreLayerOpt = Annotated[int | None, typer.Option(
    "--score-layer", min=0, rich_help_panel=POLICY_PANEL, metavar="LAYER",
    help="hae / mustdrop: the layer whose attention scores the visual tokens (0 = the first).",
)]
ParamOpt = Annotated[list[str] | None, typer.Option(
    "--param", "-p", rich_help_panel=POLICY_PANEL, metavar="NAME=VALUE",
    help="Any other policy parameter, repeatable: [bold]-p gamma=0.9 -p bin_ttl=8[/bold]. "
         "[bold]hae policies[/bold] lists every policy's parameters with their defaults and meanings.",
)]
MaxNewTokensOpt = Annotated[int, typer.Option(
    "--max-new-tokens", "-n", min=1, rich_help_panel=SAMPLING_PANEL, help="Most tokens to generate.",
)]
TemperatureOpt = Annotated[float, typer.Option(
    "--temperature", "-t", rich_help_panel=SAMPLING_PANEL, help="0 = greedy (reproducible).",
)]
TopPOpt = Annotated[float, typer.Option(
    "--top-p", rich_help_panel=SAMPLING_PANEL, help="Nucleus sampling mass in (0, 1], with --temperature > 0.",
)]
SeedOpt = Annotated[int, typer.Option("--seed", rich_help_panel=SAMPLING_PANEL, help="Sampling seed.")]
CompileFlag = Annotated[bool, typer.Option(
    "--compile", rich_help_panel=SAMPLING_PANEL,
    help="Decode through one compiled step (torch.compile; replayed as a CUDA graph on cuda): the same "
         "tokens, fewer kernel launches per token. The first step compiles it (a warm-up of seconds to a "
         "minute, shown apart from decode speed); a compile that fails falls back to eager with a note.",
)]
JsonFlag = Annotated[bool, typer.Option(
    "--json", rich_help_panel=OUTPUT_PANEL,
    help="Print only a JSON result on stdout: answer, timings, cache stats, eviction events.",
)]
NoLiveFlag = Annotated[bool, typer.Option(
    "--no-live", rich_help_panel=OUTPUT_PANEL,
    help="No live panel: stream the answer as plain text, then a summary. "
         "(Automatic when stdout is not a terminal.)",
)]
ShowKeptOpt = Annotated[Path | None, typer.Option(
    "--show-kept", rich_help_panel=OUTPUT_PANEL, metavar="FILE.png", show_default=False,
    help="Draw each image (its crops after the HD transform, and its global view) with every "
         "image token shown kept, evicted or in the recycle bin, one row per image. With --json, "
         "the same data goes in the JSON's [bold]kept[/bold] (a mask per image and layer).",
)]
KeptLayerOpt = Annotated[int | None, typer.Option(
    "--kept-layer", min=0, rich_help_panel=OUTPUT_PANEL, metavar="LAYER",
    help="The layer --show-kept draws (0 = the first). Default: the last. Per-head policies: "
         "a patch's shade is the share of heads holding it.",
)]
KeptStepOpt = Annotated[int | None, typer.Option(
    "--kept-step", min=0, rich_help_panel=OUTPUT_PANEL, metavar="STEP",
    help="Draw the cache as it was after this decode step (0 = after prefill). Default: at the end of the run.",
)]


@dataclass(frozen=True)
class KeptOptions:
    """What --show-kept draws: where, which layer (None: the last), after which step (None: the end)."""

    path: Path | None
    layer: int | None
    step: int | None


NO_KEPT = KeptOptions(None, None, None)


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
    compile: bool = False
    image_options: dict[str, int] = field(default_factory=dict)  # the family's own, by name (--image-option)

    def run_settings(self, policy):
        """The library's one run configuration, with `policy` (built and checked already)."""
        from hae_cli.api import RunSettings

        return RunSettings(policy=policy, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                           top_p=self.top_p, seed=self.seed, compile=self.compile)

    def load_options(self) -> dict[str, int]:
        """The image options to load the model with: --image-option's, and --num-crops as num_crops."""
        options = dict(self.image_options)
        if self.num_crops is not None:
            options["num_crops"] = self.num_crops
        return options


def _shared(max_new_tokens: int) -> list[tuple[str, Any, Any]]:
    """(parameter, annotation, default) of the shared options, in the order --help lists them."""
    return [
        ("model", ModelOpt, "demo"),
        ("policy", PolicyOpt, "hae"),
        ("budget", BudgetOpt, None),
        ("visual_keep", VisualKeepOpt, None),
        ("score_layer", ScoreLayerOpt, None),
        ("param", ParamOpt, None),
        ("num_crops", NumCropsOpt, None),
        ("image_option", ImageOptionOpt, None),
        ("max_new_tokens", MaxNewTokensOpt, max_new_tokens),
        ("temperature", TemperatureOpt, 0.0),
        ("top_p", TopPOpt, 1.0),
        ("seed", SeedOpt, 0),
        ("compile", CompileFlag, False),
        ("device", DeviceOpt, None),
        ("dtype", DtypeOpt, None),
    ]


_KEPT = [("show_kept", ShowKeptOpt, None), ("kept_layer", KeptLayerOpt, None), ("kept_step", KeptStepOpt, None)]


def run_command_options(*, max_new_tokens: int = 128, kept: bool = False):
    """Give a command the shared options: its signature gains them (after its own parameters),
    and it is called with `options=RunOptions(...)` (and `kept=KeptOptions(...)`) instead."""

    def decorate(command):
        signature = inspect.signature(command, eval_str=True)
        own = [p for name, p in signature.parameters.items() if name not in ("options", "kept")]
        shared = _shared(max_new_tokens) + (_KEPT if kept else [])
        added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)
                 for name, annotation, default in shared]

        @functools.wraps(command)
        def with_options(**values):
            given = {name: values.pop(name) for name, _, _ in shared}
            if kept:
                values["kept"] = KeptOptions(given.pop("show_kept"), given.pop("kept_layer"), given.pop("kept_step"))
            return command(**values, options=run_options(**given))

        parameters = own + added
        with_options.__signature__ = signature.replace(parameters=parameters)
        with_options.__annotations__ = {p.name: p.annotation for p in parameters}
        del with_options.__wrapped__
        return with_options

    return decorate


def run_options(**values) -> RunOptions:
    """The shared options' values -> RunOptions (the policy arguments parsed, not yet matched to a policy)."""
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
        compile=values["compile"],
        image_options=image_options(values["image_option"]),
    )


def image_options(items: list[str] | None) -> dict[str, int]:
    """--image-option NAME=N, repeated -> {name: N} (the family checks the names when it loads)."""
    options = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name or not value.strip().isdigit():
            raise ConfigError(f"--image-option expects NAME=N (a whole number), got {item!r}")
        options[name] = int(value)
    return options
