"""Gemma 3 through transformers' own classes and processor."""

from hae_cli.model.gemma3.model import Gemma3

FAMILY = Gemma3  # what `hae_cli.model.loading.families` finds

__all__ = ["FAMILY", "Gemma3"]
