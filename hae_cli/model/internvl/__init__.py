"""InternVL 3 (transformers' native `internvl`) through its own classes and processor."""

from hae_cli.model.internvl.model import InternVL

FAMILY = InternVL  # what `hae_cli.model.loading.families` finds

__all__ = ["FAMILY", "InternVL"]
