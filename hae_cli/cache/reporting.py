"""What the cache tells its watchers: eviction events, the time eviction costs, and snapshots.

Counting tags on the device and reading the counts back is a sync on CUDA, so events are
noted as count tensors and read in one go when a step ends (`EventLog.flush`), and a snapshot
gathers every layer's counts before one copy to the host.
"""

from __future__ import annotations

import time

import torch

from hae_cli.cache.modality import MODALITY_NAMES, Modality
from hae_cli.cache.stats import CacheStats, EvictionEvent, LayerStats


class EventLog:
    """Events noted as tag counts during a step, turned into `EvictionEvent`s once per step."""

    def __init__(self) -> None:
        self.events: list[EvictionEvent] = []
        self._pending: list = []

    def record(self, step: int, layer_idx: int, stage: str, action: str, modality: torch.Tensor) -> None:
        """An event on tokens with these modality tags (`[n]`, or `[H, n]`: the mean over heads)."""
        self.record_counts(step, layer_idx, stage, action, count_modalities(modality))

    def record_counts(self, step: int, layer_idx: int, stage: str, action: str, counts: torch.Tensor) -> None:
        self._pending.append((step, layer_idx, stage, action, counts))

    def flush(self) -> None:
        if not self._pending:
            return
        counts = gather_counts([pending[-1] for pending in self._pending]).tolist()
        for (step, layer_idx, stage, action, _), values in zip(self._pending, counts):
            by_name = {MODALITY_NAMES[m]: int(round(values[m])) for m in Modality}
            if any(by_name.values()):
                self.events.append(EvictionEvent(step, layer_idx, stage, action, by_name))
        self._pending = []


class Stopwatch:
    """Seconds spent on eviction work, by part; `sync` waits for CUDA around each reading
    (exact, slower)."""

    PARTS = ("observe", "prefill", "scores", "rounds")

    def __init__(self, sync: bool = False) -> None:
        self.sync = sync
        self.seconds = dict.fromkeys(self.PARTS, 0.0)

    def now(self) -> float:
        if self.sync and torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def add(self, part: str, since: float) -> float:
        """Add the time since `since` to `part`; returns now."""
        now = self.now()
        self.seconds[part] += now - since
        return now

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def snapshot(layers, asides, step: int, tokens_fed: int, image_sizes: list[int],
             events: list[EvictionEvent]) -> CacheStats:
    """The cache after decode step `step` (0: the prefill), with that step's events."""
    counts = gather_counts([_layer_modality_counts(layer) for layer in layers]).tolist()
    images = len(image_sizes)
    held = gather_counts([count_images(layer.image_id, images) for layer in layers]).tolist()
    binned = gather_counts([count_images(aside.bin.image_id, images) for aside in asides]).tolist()
    reserved = gather_counts([count_images(aside.reserve.image_id, images) for aside in asides]).tolist()
    stats = [
        LayerStats(
            layer=idx,
            tokens_by_modality={MODALITY_NAMES[m]: int(round(counts[idx][m])) for m in Modality},
            tokens_held=layer.held,
            budget=layer.budget,
            bin_tokens=len(aside.bin),
            bytes_held=layer.bytes_held,
            bin_bytes=aside.bin.nbytes,
            tokens_by_image=[int(round(c)) for c in held[idx]] if images else [],
            bin_by_image=[int(round(c)) for c in binned[idx]] if images else [],
            bytes_allocated=layer.bytes_allocated,
            reserve_tokens=len(aside.reserve),
            reserve_bytes=aside.reserve.nbytes,
            reserve_by_image=[int(round(c)) for c in reserved[idx]] if images else [],
            window=layer.window,
        )
        for idx, (layer, aside) in enumerate(zip(layers, asides))
    ]
    full = sum(tokens_fed * layer.bytes_per_token for layer in layers)
    return CacheStats(step, stats, full, [e for e in events if e.step == step], list(image_sizes))


def add_image_slots(image_sizes: list[int], image_id: torch.Tensor) -> None:
    """Add a forward's slots per image to `image_sizes` (image k at k-1), read from the tags as
    the caller made them (on the host for prompts and decode steps: no device sync)."""
    if not image_id.numel():
        return
    fed = torch.bincount(image_id.long().cpu()).tolist()[1:]
    image_sizes += [0] * max(0, len(fed) - len(image_sizes))
    for k, count in enumerate(fed):
        image_sizes[k] += count


def _layer_modality_counts(layer) -> torch.Tensor:
    if layer.modality is None:
        return torch.zeros(len(Modality))
    return count_modalities(layer.modality)


def count_modalities(modality: torch.Tensor) -> torch.Tensor:
    """Tokens per modality, `[4]` float (for `[H, n]` tags the mean over heads), without a sync."""
    return _count_values(modality, 0, len(Modality))


def count_images(image_id: torch.Tensor | None, images: int) -> torch.Tensor:
    """Tokens of images 1..`images`, `[images]` float (for `[H, n]` tags the mean over heads)."""
    if image_id is None or not images:
        return torch.zeros(images)
    return _count_values(image_id, 1, images + 1)


def _count_values(tags: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """How many tags equal each of `start..stop-1`, float (`[H, n]` tags: the mean over heads)."""
    tags = tags.long()
    if tags.dim() == 1:
        tags = tags[None]
    one_hot = tags[..., None] == torch.arange(start, stop, device=tags.device)
    return one_hot.sum(dim=1).float().mean(dim=0)


def gather_counts(counts: list[torch.Tensor]) -> torch.Tensor:
    """Stack small count tensors on one device and copy them to the host once."""
    if not counts:
        return torch.zeros(0, len(Modality))
    device = next((c.device for c in counts if c.device.type != "cpu"), torch.device("cpu"))
    return torch.stack([c.float().to(device) for c in counts]).cpu()
