"""What one layer keeps beside its storage: the recycle bin, the conversation reserve, the stash.

None of it is attended: the bin and the reserve hold rows that left the attention path (a
round's evictions, a prefill's set-aside image tokens), the stash holds decode queries not yet
folded into the scores. The layer's storage (`EvictingLayer`) knows nothing of them; the
cache keeps one `LayerAside` per layer, and the modules that decide a move act on both
(`rounds.py`, `reserve.py`, `window.py`, `observation.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hae_cli.cache.recycle_bin import RecycleBin
from hae_cli.cache.reserve import Reserve
from hae_cli.cache.stash import QueryStash


@dataclass(eq=False)
class LayerAside:
    """A layer's bin, reserve and stash, reset with the cache."""

    bin: RecycleBin = field(default_factory=RecycleBin)
    reserve: Reserve = field(default_factory=Reserve)
    stash: QueryStash = field(default_factory=QueryStash)
