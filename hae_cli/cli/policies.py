"""`hae policies`: every policy, what it does, and its parameters with their defaults."""

from __future__ import annotations

from rich.console import Console

from hae_cli.cli import validate
from hae_cli.cli.app import app
from hae_cli.cli.validate import policy_fields


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
    for name, cls in validate.policies().items():
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
