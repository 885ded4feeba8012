"""Decode queries waiting to be folded into a layer's running scores.

An eager forward appends its queries to a list (joined once, when they are folded). A compiled
decode step cannot grow a list: it writes its one query into a fixed-size ring instead, at a
slot counted on the device, so the step has the same shapes at every call. The ring is read
(and emptied) outside the step, at the fold; queries from both keep their feed order because
an eager forward first moves what the ring holds into the list.
"""

from __future__ import annotations

import torch


class QueryRing:
    """Room for `size` queries `[H_q, size, D]` and their token indices, filled in place by a
    compiled step (`write`); `count` is the device's count, `filled` the host's mirror of it."""

    def __init__(self, size: int, heads: int, head_dim: int, dtype: torch.dtype, device) -> None:
        self.queries = torch.zeros(heads, size, head_dim, dtype=dtype, device=device)
        self.token_index = torch.zeros(size, dtype=torch.int64, device=device)
        self.count = torch.zeros((), dtype=torch.int64, device=device)
        self.filled = 0

    @property
    def size(self) -> int:
        return self.token_index.numel()

    def write(self, query: torch.Tensor, token_index: torch.Tensor) -> None:
        """Inside the step: query `[H_q, 1, D]` and its index (a 0-d tensor) at slot `count`."""
        slot = self.count.view(1)
        self.queries.index_copy_(1, slot, query.to(self.queries.dtype))
        self.token_index.index_copy_(0, slot, token_index.view(1))
        self.count.add_(1)

    def drain(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the filled slots, oldest first; the ring is empty after."""
        filled, self.filled = self.filled, 0
        self.count.zero_()
        return self.queries[:, :filled].clone(), self.token_index[:filled].clone()


class QueryStash:
    """A layer's queries not yet in its scores: `add` (eager) and the ring (a compiled step)."""

    def __init__(self) -> None:
        self.queries: list[torch.Tensor] = []  # [H_q, q, D] each, post-RoPE
        self.token_index: list[torch.Tensor] = []  # [q] each
        self.ring: QueryRing | None = None
        self.listed = 0  # queries in the list
        self.scaling: float | None = None  # the layer's softmax scale, as attention last used it: the fold's

    def __len__(self) -> int:
        return self.listed + (self.ring.filled if self.ring is not None else 0)

    def add(self, queries: torch.Tensor, token_index: torch.Tensor) -> None:
        self._move_ring_to_list()
        self.queries.append(queries)
        self.token_index.append(token_index)
        self.listed += token_index.numel()

    def take(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The queries `[H_q, t, D]` (oldest first) and their token indices `[t]`, or Nones; empty after."""
        if self.ring is not None and self.ring.filled and not self.queries:
            return self.ring.drain()
        self._move_ring_to_list()
        if not self.queries:
            return None, None
        queries, token_index = self.queries, self.token_index
        self.queries, self.token_index, self.listed = [], [], 0
        if len(queries) == 1:
            return queries[0], token_index[0]
        return torch.cat(queries, dim=1), torch.cat(token_index)

    def _move_ring_to_list(self) -> None:
        if self.ring is not None and self.ring.filled:
            queries, token_index = self.ring.drain()
            self.queries.append(queries)
            self.token_index.append(token_index)
            self.listed += token_index.numel()
