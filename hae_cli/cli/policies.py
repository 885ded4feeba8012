"""`hae policies`: every policy, what it does, and its parameters with their defaults and
meanings, read from the policy registry and each parameter's own declaration (`param`)."""

from __future__ import annotations

import dataclasses

from rich.console import Console

from hae_cli.cli import validate
from hae_cli.cli.app import app

BUDGET_AND_BUFFER = (
    "A layer with a budget holds up to budget + buffer tokens while decoding: new tokens append "
    "until it holds budget + buffer, then one round evicts it back to the budget (buffer 0: it "
    "holds the budget exactly)."
)


@app.command("policies")
def list_policies() -> None:
    """List the cache policies and their parameters (default and meaning), as --policy and -p NAME=VALUE take them.

    A layer with a budget holds up to budget + buffer tokens while decoding, then one round evicts it back to the budget.

    Example: [cyan]hae ask sample_images/easyvqa_test_0698.png "what shape is in the image?" --policy streaming --budget 256 -p sink=8[/cyan]
    """
    from rich.table import Table
    from rich.text import Text

    from hae_cli.cache.policies import known_policies, parameter_help

    table = Table(header_style="bold", show_lines=True, caption=BUDGET_AND_BUFFER, caption_justify="left")
    table.add_column("policy", style="bold cyan", no_wrap=True)
    table.add_column("what it does", ratio=2, overflow="fold")  # a paper's URL folds, never cut
    table.add_column("parameters: default, meaning", ratio=3, overflow="fold")
    for name, cls in known_policies().items():
        doc = (cls.__doc__ or "").strip().split("\n\n")[0]
        meanings = parameter_help(cls)
        params = Text()
        for field in validate.policy_fields(name).values():
            if params:
                params.append("\n")
            params.append(field.name, style="bold").append(f" = {_default(field)}")
            params.append(f"  {meanings.get(field.name, '')}")
        table.add_row(name, " ".join(doc.split()), params if params else "-")
    Console().print(table)


def _default(field) -> str:
    if field.default is not dataclasses.MISSING:
        return repr(field.default)
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(field.default_factory())  # type: ignore[misc]
    return "(required)"


@app.command("families")
def list_families() -> None:
    """List the model families --model loads (by config.json's model_type) and how HAE sees each.

    Every policy, the recycle bin, the live panel, chat and --show-kept work on all of them; each family's decoder is walked layer by layer, so HAE's index broadcasting saves the pruned tokens' compute too.

    Example: [cyan]hae ask sample_images/easyvqa_test_0698.png "What is in the picture?" --model Qwen/Qwen2-VL-2B-Instruct[/cyan]
    """
    from rich.table import Table
    from rich.text import Text

    from hae_cli.model.loading import families

    by_class: dict[type, list[str]] = {}
    for model_type, cls in families().items():
        by_class.setdefault(cls, []).append(model_type)
    table = Table(header_style="bold", show_lines=True)
    for column in ("family", "model_type", "an image becomes", "HAE's per-image floor draws on", "--show-kept draws",
                   "--image-option"):
        table.add_column(column, style="bold cyan" if column == "family" else None)
    for cls, types in sorted(by_class.items(), key=lambda item: (item[0].model_types != ("phi3_v",), item[0].family)):
        options = "\n".join(f"{name}: {what}" for name, what in cls.image_options.items()) or "none"
        table.add_row(cls.family, ", ".join(types), cls.image_tokens, cls.overview, cls.kept_views, options)
    console = Console()
    # the width at which no word of any cell is cut: each column its longest word, and the borders
    needed = sum(max(len(word) for cell in [column.header, *column.cells] for word in str(cell).split())
                 for column in table.columns) + 3 * len(table.columns) + 1
    if needed <= console.width:
        console.print(table)
        return
    # too narrow for the table without cutting a name ("Phi-3.5-Visi…" at 80 columns): one block a family
    headers = [str(column.header) for column in table.columns]
    for number, row in enumerate(zip(*(column.cells for column in table.columns))):
        console.print(Text.assemble("\n" if number else "", (str(row[0]), "bold cyan"), f" ({row[1]})"))
        for header, cell in zip(headers[2:], row[2:]):
            console.print(Text.assemble(("  " + header + ": ", "bold"), str(cell)))
