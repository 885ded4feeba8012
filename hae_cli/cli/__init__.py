"""`hae`: ask about an image, tell a story over several, or profile policies side by side.

Thin on purpose: it parses and validates options, calls `hae_cli.api`, and renders with
`hae_cli.display`. One module per responsibility: `app` (the Typer app and one-line errors),
`options` (the shared options), `validate` (checks before the model loads), `output`
(spinner, JSON), and one module per command group (`run`: ask and story; `profile`;
`policies`).
"""

from hae_cli.cli import policies, profile, run  # noqa: F401  (registers the commands)
from hae_cli.cli.app import app, main

__all__ = ["app", "main"]
