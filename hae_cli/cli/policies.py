"""`hae policies`: every policy, what it does, and its parameters with their defaults and
meanings, the meanings read from the policy's own docstring (kvpress style: `name: meaning`,
continued on deeper-indented lines; `a, b: meaning` for several)."""

from __future__ import annotations

import dataclasses
import inspect
import re

from rich.console import Console

from hae_cli.cli import validate
from hae_cli.cli.app import app
from hae_cli.cli.validate import policy_fields

_PARAMETER_LINE = re.compile(r"^(\s+)([a-z_][a-z0-9_]*(?:,\s*[a-z_][a-z0-9_]*)*):\s+(\S.*)$")
_SENTENCE_END = re.compile(r"(?<=\.)\s+(?=[A-Z])")
_SEE_OTHER = re.compile(r"^as in `(\w+)`")

BUDGET_AND_BUFFER = (
    "A layer with a budget holds up to budget + buffer tokens while decoding: new tokens append "
    "until it holds budget + buffer, then one round evicts it back to the budget (buffer 0: it "
    "holds the budget exactly)."
)


def parameter_meanings(cls: type) -> dict[str, str]:
    """{parameter: its one-line meaning}, the first sentence of what the docstring says of it."""
    names = set(policy_fields_of(cls))
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    meanings: dict[str, str] = {}
    i = 0
    while i < len(lines):
        match = _PARAMETER_LINE.match(lines[i])
        group = [n.strip() for n in match.group(2).split(",")] if match else []
        if not group or not set(group) <= names:
            i += 1
            continue
        indent, text = len(match.group(1)), [match.group(3)]
        i += 1
        while i < len(lines) and lines[i].strip() and len(lines[i]) - len(lines[i].lstrip()) > indent:
            text.append(lines[i].strip())
            i += 1
        first = _SENTENCE_END.split(" ".join(text))[0].rstrip(" .;") + "."
        for name in group:
            meanings.setdefault(name, first)
    return meanings


def policy_fields_of(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []


def all_meanings() -> dict[str, dict[str, str]]:
    """Every policy's meanings; "as in `hae`" is replaced by what `hae` says of the parameter."""
    registry = validate.policies()
    meanings = {name: parameter_meanings(cls) for name, cls in registry.items()}
    for own in meanings.values():
        for param, meaning in own.items():
            other = _SEE_OTHER.match(meaning)
            if other and param in meanings.get(other.group(1), {}):
                own[param] = f"{meanings[other.group(1)][param].rstrip('.')} (as in {other.group(1)})."
    return meanings


@app.command("policies")
def list_policies() -> None:
    """List the cache policies and their parameters (default and meaning), as --policy and -p NAME=VALUE take them.

    A layer with a budget holds up to budget + buffer tokens while decoding, then one round evicts it back to the budget.

    Example: [cyan]hae ask cat.jpg "What is it?" --policy streaming --budget 256 -p sink=8[/cyan]
    """
    from rich.table import Table
    from rich.text import Text

    table = Table(header_style="bold", show_lines=True, caption=BUDGET_AND_BUFFER, caption_justify="left")
    table.add_column("policy", style="bold cyan", no_wrap=True)
    table.add_column("what it does", ratio=2)
    table.add_column("parameters: default, meaning", ratio=3)
    meanings = all_meanings()
    for name, cls in validate.policies().items():
        doc = (cls.__doc__ or "").strip().split("\n\n")[0]
        params = Text()
        for field in policy_fields(name).values():
            if params:
                params.append("\n")
            params.append(field.name, style="bold").append(f" = {_default(field)}")
            params.append(f"  {meanings[name].get(field.name, '')}")
        table.add_row(name, " ".join(doc.split()), params if params else "-")
    Console().print(table)


def _default(field) -> str:
    if field.default is not dataclasses.MISSING:
        return repr(field.default)
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(field.default_factory())  # type: ignore[misc]
    return "(required)"
