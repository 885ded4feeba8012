"""Qwen3-VL through transformers' own classes and processor."""

from hae_cli.model.qwen3_vl.model import Qwen3VL

FAMILY = Qwen3VL  # what `hae_cli.model.loading.families` finds

__all__ = ["FAMILY", "Qwen3VL"]
