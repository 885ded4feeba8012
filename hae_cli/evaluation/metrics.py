"""How an answer is scored against the full cache's: the share of its tokens reproduced in place."""

from __future__ import annotations

from collections.abc import Sequence


def agreement(ids: Sequence[int], full_ids: Sequence[int]) -> float:
    """Share of the full cache's output tokens that this output reproduces at the same place."""
    if not full_ids:
        return float(not ids)
    return sum(a == b for a, b in zip(ids, full_ids)) / len(full_ids)
