"""hae: Phi-3.5-Vision with a Hierarchical Adaptive Eviction KV cache."""

__version__ = "0.1.0"
