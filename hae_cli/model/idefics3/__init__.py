"""Idefics3 and SmolVLM through transformers' own classes and processors."""

from hae_cli.model.idefics3.model import Idefics3

FAMILY = Idefics3  # what `hae_cli.model.loading.families` finds

__all__ = ["FAMILY", "Idefics3"]
