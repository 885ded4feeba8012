"""The conversation reserve: what a prefill set aside for a later question, and the moves in and out.

In a conversation the images are compressed before any question is known. A policy that keeps
what it drops for later (`PrefillKeep.to_reserve`) moves those rows here: off the attention
path like the bin's, but never aged or trimmed by a round. Once anything was set aside, image
tokens a round evicts come here too (`active`), and a new turn's question may swap reserve and
bin tokens back for held ones (`question.py`). A sliding window still drops what no token can
see (`window.py`).
"""

from __future__ import annotations

import torch

from hae_cli.cache.indices import complement
from hae_cli.cache.recycle_bin import RecycleBin, TokenRows


class Reserve(RecycleBin):
    """A recycle bin that rounds leave alone; `protected`: token indices a later turn may not
    swap out (`PrefillKeep.protected`, an image's floor)."""

    def __init__(self) -> None:
        super().__init__()
        self.active = False  # once anything was set aside, image tokens a round evicts go here too
        self.protected = torch.zeros(0, dtype=torch.int64)


def move_to_reserve(layer, aside, index: torch.Tensor) -> TokenRows:
    """Move a layer's rows `index` (`[n]`, the same in every head) to its reserve; returns them."""
    return swap_with_reserve(layer, aside, index, index[:0], index[:0])[0]


def swap_with_reserve(layer, aside, evict: torch.Tensor, from_reserve: torch.Tensor, from_bin: torch.Tensor,
                      to_bin: bool = False) -> tuple[TokenRows, TokenRows]:
    """Move rows `evict` (`[n]`) to the reserve (the bin, `to_bin`) and bring back reserve tokens
    `from_reserve` and bin tokens `from_bin` (indices before this call), at their original index,
    rebuilding the layer once. Returns (moved out, brought back)."""
    evict = evict.to(layer.device)
    evicted = layer.take(evict)
    back = [layer.take(evict[:0])]
    if from_reserve.numel():
        back.append(aside.reserve.take(from_reserve, layer.device))
    if from_bin.numel():
        back.append(aside.bin.take(from_bin, layer.device))
    restored = TokenRows.cat(back)
    if evict.numel() or len(restored):
        layer.compact(complement(evict, layer.held), restored)
    (aside.bin if to_bin else aside.reserve).add(evicted)
    aside.reserve.active |= not to_bin and len(evicted) > 0
    return evicted, restored
