"""Plain snapshots of the cache for the display, the profiler and `--json`.

They hold numbers only (no tensors), so they can be kept per step, rendered by a pure
function and serialised with `dataclasses.asdict`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LayerStats:
    layer: int
    tokens_by_modality: dict[str, int]  # keys: "text", "image", "separator", "generated"
    tokens_held: int  # per head (every head of a layer holds the same count)
    budget: int | None  # None: no budget (full cache)
    bin_tokens: int  # tokens in this layer's recycle bin
    bytes_held: int  # K+V bytes of the rows held: tokens held x bytes per token
    bin_bytes: int
    # image k's tokens (features and separators) at index k-1: held, and in the bin
    tokens_by_image: list[int] = field(default_factory=list)
    bin_by_image: list[int] = field(default_factory=list)
    bytes_allocated: int = 0  # K+V storage, measured from the tensors: held rows and spare room
    reserve_tokens: int = 0  # tokens a prefill set aside for a later question (off the attention path)
    reserve_bytes: int = 0
    reserve_by_image: list[int] = field(default_factory=list)
    window: int | None = None  # a sliding layer sees only its last `window` tokens: it holds at most window - 1

    @property
    def limit(self) -> int | None:
        """The most tokens the layer keeps after a step: its budget, or less where its window says so."""
        if self.window is None:
            return self.budget
        return self.window - 1 if self.budget is None else min(self.budget, self.window - 1)


@dataclass(frozen=True)
class EvictionEvent:
    step: int  # decode step (0 = prefill)
    layer: int
    stage: str  # "prefill" or "decode"
    action: str  # "evicted" (gone for good), "binned", "restored", "deleted" (from the bin)
    counts: dict[str, int]  # by modality name


@dataclass(frozen=True)
class CacheStats:
    step: int
    layers: list[LayerStats]
    full_cache_bytes: int  # what a full cache would hold now (tokens seen x bytes/token, all layers)
    events: list[EvictionEvent] = field(default_factory=list)  # events of this step only
    image_sizes: list[int] = field(default_factory=list)  # slots fed of image k at index k-1

    @property
    def bytes_held(self) -> int:
        return sum(layer.bytes_held for layer in self.layers)

    @property
    def bytes_allocated(self) -> int:
        return sum(layer.bytes_allocated for layer in self.layers)

    @property
    def bin_bytes(self) -> int:
        return sum(layer.bin_bytes for layer in self.layers)

    @property
    def reserve_bytes(self) -> int:
        return sum(layer.reserve_bytes for layer in self.layers)

    @property
    def host_bytes(self) -> int:
        """K/V off the attention path (the bin and the reserve: host memory on CUDA)."""
        return self.bin_bytes + self.reserve_bytes
