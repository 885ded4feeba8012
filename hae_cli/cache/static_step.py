"""What a compiled decode step sees of the cache: fixed-shape storage, counts on the device.

Between two eviction rounds a layer's storage keeps its size (`budget + buffer` rows, or the
room made for a run without a budget), so a step can attend over all of it with a validity
mask, as transformers' `StaticCache` does, and write its row in place at the held count. That
count, the step's token index and the query ring's slot live on the device and are advanced
by the step itself: nothing in it reads a host value or calls back into the cache's Python
bookkeeping. The cache brings them up to date before a step (`EvictingCache.begin_static_step`)
and does its bookkeeping after it (`end_static_step`): folds, rounds, restores, the bin.

`StaticStep` is handed to the decoder layers as their cache (`update`) and to the attention
function (`stash`), so every model family's own layers run unchanged.
"""

from __future__ import annotations

import torch
import torch._dynamo

from hae_cli.cache.layer import GROWTH_ROWS
from hae_cli.cache.modality import Modality
from hae_cli.cache.policies.capabilities import keeps_decode_scores
from hae_cli.cache.stash import QueryRing


class StaticStep:
    """Per layer: the storage and a 0-d held count; the step's token index (set by the host, a
    `fill_`, before each step); the query rings."""

    def __init__(self, layers, asides, stashing: list[bool], ring_size: int, query_shape: tuple[int, int]) -> None:
        device = layers[0].keys.device
        self.index = torch.zeros((), dtype=torch.int64, device=device)  # the token this step feeds
        self.held = [torch.zeros((), dtype=torch.int64, device=device) for _ in layers]
        self.held_host = [-1] * len(layers)  # what `held` was last set to from the host
        self.storage: list[dict[str, torch.Tensor]] = [{} for _ in layers]
        self.positions: list[torch.Tensor] = [torch.empty(0)] * len(layers)
        self.rings: list[QueryRing | None] = []
        for layer, aside, stashes in zip(layers, asides, stashing):
            ring = None
            if stashes:
                ring = QueryRing(ring_size, *query_shape, dtype=layer.keys.dtype, device=device)
                aside.stash.ring = ring
            self.rings.append(ring)
        _static_addresses([self.index, *self.held] + [t for ring in self.rings if ring is not None
                                                      for t in (ring.queries, ring.token_index, ring.count)])

    @classmethod
    def ready(cls, step: "StaticStep | None", layers, asides, policy, index: int,
              query_shape: tuple[int, int]) -> "StaticStep":
        """The step for token `index`: room in a full layer (only one without a bound can be full),
        the step made once (rings where the policy keeps decode scores), then refreshed."""
        for layer in layers:
            if layer.held >= layer.capacity:
                layer.make_room(layer.held + GROWTH_ROWS)
        if step is None:
            stashing = [keeps_decode_scores(policy, i) for i in range(len(layers))]
            step = cls(layers, asides, stashing, max(1, policy.buffer), query_shape)
        step.refresh(layers, index)
        return step

    def refresh(self, layers, index: int) -> None:
        """Point at each layer's storage and set the counts the host changed (after a round, a
        resize or an eager forward). A `fill_` is a kernel with a host scalar: no sync."""
        self.index.fill_(index)
        for layer_idx, layer in enumerate(layers):
            storage = layer._storage
            if self.storage[layer_idx].get("keys") is not storage["keys"]:
                self.storage[layer_idx] = dict(storage)
                self.positions[layer_idx] = torch.arange(layer.capacity, device=storage["keys"].device)
                _static_addresses(list(storage.values()))
            if self.held_host[layer_idx] != layer.held:
                self.held[layer_idx].fill_(layer.held)
                self.held_host[layer_idx] = layer.held

    def advanced(self, layers) -> None:
        """The host's mirror of what a step did: one row more per layer, one query per ring."""
        for layer_idx, layer in enumerate(layers):
            layer._held += 1
            self.held_host[layer_idx] = layer.held
            ring = self.rings[layer_idx]
            if ring is not None:
                ring.filled += 1

    # --- inside the step ---

    def attention_mask(self, layer_idx: int) -> torch.Tensor:
        """`[1, 1, 1, capacity]`: the held rows and the one this step writes (at `held`)."""
        return (self.positions[layer_idx] <= self.held[layer_idx]).view(1, 1, 1, -1)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write the step's row at the held count; returns the whole storage (masked by `attention_mask`)."""
        storage, held = self.storage[layer_idx], self.held[layer_idx]
        slot = held.view(1)
        heads = key_states.shape[1]
        storage["keys"].index_copy_(2, slot, key_states)
        storage["values"].index_copy_(2, slot, value_states)
        storage["token_index"].index_copy_(1, slot, self.index.view(1, 1).expand(heads, 1))
        storage["modality"].index_fill_(1, slot, int(Modality.GENERATED))
        storage["image_id"].index_fill_(1, slot, 0)
        storage["scores"].index_fill_(1, slot, 0.0)
        held.add_(1)
        return storage["keys"], storage["values"]

    def stash(self, layer_idx: int, query: torch.Tensor) -> None:
        """Called by the attention function with the step's query `[1, H_q, 1, D]`."""
        ring = self.rings[layer_idx]
        if ring is not None:
            ring.write(query[0], self.index)


def _static_addresses(tensors: list[torch.Tensor]) -> None:
    """On CUDA, tell the compiler these tensors keep their address from call to call, so a CUDA
    graph writes them in place instead of copying them in and out at every replay."""
    if tensors and tensors[0].is_cuda:
        for tensor in tensors:
            torch._dynamo.mark_static_address(tensor)
