"""LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision through transformers' own classes and processors."""

from hae_cli.model.llava.model import Llava, LlavaNext, LlavaOnevision

FAMILY = (Llava, LlavaNext, LlavaOnevision)  # what `hae_cli.model.loading.families` finds

__all__ = ["FAMILY", "Llava", "LlavaNext", "LlavaOnevision"]
