"""Phi-3.5-Vision-Instruct: Microsoft's checkpoint layout on transformers' native Phi-3 decoder,
with our image embedding (CLIP, HD crops, separators), prompt rule and limits."""

from hae_cli.model.phi3v.model import Phi35Vision

FAMILY = Phi35Vision  # what `hae_cli.model.loading.families` finds

__all__ = ["FAMILY", "Phi35Vision"]
