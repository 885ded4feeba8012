"""Sliding layers: a layer that sees only its last `window` tokens holds no more than that.

At the end of every step, whatever the policy, such a layer drops for good what no later token
can see, from its storage, its bin and its reserve; between rounds its storage is bounded by
the window too. A one-token step over it then needs no mask.
"""

from __future__ import annotations

import torch


def trim_to_window(layer, aside, next_index: int) -> torch.Tensor | None:
    """Drop every row no token from `next_index` on can see (index <= next_index - window), and
    the same from the bin and the reserve; returns the dropped rows' modality tags (None: none,
    or no window). Every head keeps the same count: where heads differ, the newest rows that all
    of them may keep."""
    if layer.window is None or not layer.held:
        return None
    cutoff = next_index - layer.window
    for store in (aside.bin, aside.reserve):
        if len(store):
            store.delete((store.token_index <= cutoff).nonzero().squeeze(-1))
    keep = int((layer.token_index > cutoff).sum(dim=1).min())
    if keep == layer.held:
        return None
    dropped = layer.modality[:, : layer.held - keep].clone()
    layer.compact(torch.arange(layer.held - keep, layer.held, device=layer.device))
    return dropped


def window_bound(bound: int | None, window: int | None) -> int | None:
    """The most rows a layer holds between rounds: its policy's bound, and no more than its
    window (`window - 1` rows it may still need, and the step's own)."""
    if window is None:
        return bound
    return window if bound is None else min(bound, window)
