"""InternVL 3 / 3.5 through transformers' own classes and processor."""

from hae_cli.model.internvl.model import InternVL

FAMILY = InternVL  # what `hae_cli.model.loading.families` finds

__all__ = ["FAMILY", "InternVL"]
