"""Mistral 3 (Mistral-Small-3.1 / 3.2) through transformers' own classes and processor."""

from hae_cli.model.mistral3.model import Mistral3

FAMILY = Mistral3  # what `hae_cli.model.loading.families` finds

__all__ = ["FAMILY", "Mistral3"]
