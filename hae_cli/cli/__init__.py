"""`hae`: ask about an image, tell a story over several, chat about them, or profile policies side by side.

Thin on purpose: it parses and validates options, calls `hae_cli.api`, and renders with
`hae_cli.display`. One module per responsibility: `app` (the Typer app and one-line errors),
`options` (the shared options), `validate` (checks before the model loads), `output`
(spinner, JSON), and one module per command group (`run`: ask and story; `chat`; `profile`;
`policies`; `eval`).
"""

from hae_cli.cli.app import app, main

# Importing a command module registers its commands, in the order `hae --help` lists them.
from hae_cli.cli import run  # noqa: E402,F401  (ask, story)
from hae_cli.cli import chat  # noqa: E402,F401,I001
from hae_cli.cli import profile  # noqa: E402,F401,I001
from hae_cli.cli import eval  # noqa: E402,F401,I001
from hae_cli.cli import policies  # noqa: E402,F401,I001

__all__ = ["app", "main"]
