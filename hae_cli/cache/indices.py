"""Row-index arithmetic shared by the storage, the moves and the policies (no state, no storage).

A policy that names the rows to keep or drop needs `complement`; it imports it from here, never
from the storage module, so a policy knows nothing of how a layer stores its rows.
"""

from __future__ import annotations

import torch


def complement(index: torch.Tensor, size: int) -> torch.Tensor:
    """Rows of `range(size)` not in `index` (distinct rows; `[n]` -> `[size - n]`, `[H, n]` ->
    `[H, size - n]`), ascending. The result size is known, so no device sync."""
    if index.dim() == 1:
        keep = torch.ones(size, dtype=torch.bool, device=index.device)
        keep[index] = False
        return torch.nonzero_static(keep, size=size - index.numel()).squeeze(-1)
    heads, kept = index.shape[0], size - index.shape[1]
    keep = torch.ones(heads, size, dtype=torch.bool, device=index.device)
    keep.scatter_(1, index, False)
    return torch.nonzero_static(keep, size=heads * kept)[:, 1].reshape(heads, kept)


def same_in_every_head(token_index: torch.Tensor) -> bool:
    """Whether every head of `[H, N]` token indices holds the same tokens."""
    return token_index.shape[0] == 1 or bool((token_index == token_index[:1]).all())
