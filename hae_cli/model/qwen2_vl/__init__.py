"""Qwen2-VL and Qwen2.5-VL through transformers' own classes and processor."""

from hae_cli.model.qwen2_vl.model import Qwen2VL

FAMILY = Qwen2VL  # what `hae_cli.model.loading.families` finds

__all__ = ["FAMILY", "Qwen2VL"]
