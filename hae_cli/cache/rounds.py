"""Decode rounds: a layer that holds `budget + buffer` tokens is brought back to its budget.

Candidates are the unprotected active rows `[sink, n - recent)`, then the recycle bin's
tokens; the best `budget - sink - recent` of them by the policy's priority stay active. The
rest of the active ones go to the bin (or are evicted for good without one), the chosen bin
tokens come back at their original index, and the bin is trimmed (age, then capacity). With a
representative layer, its choice (in token indices) is followed by every other layer. The moves
between a layer and its bin live here, where they are decided.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hae_cli.cache.indices import complement
from hae_cli.cache.modality import Modality
from hae_cli.cache.policies import LayerView
from hae_cli.cache.policies.capabilities import recycle_bin, representative_layer
from hae_cli.cache.recycle_bin import RecycleBin, TokenRows
from hae_cli.cache.reporting import EventLog, count_modalities
from hae_cli.cache.reserve import move_to_reserve


@dataclass(frozen=True)
class RoundDecision:
    """A round at the representative layer, in token indices, so other layers can follow it."""

    kept: torch.Tensor  # indices of unprotected tokens active after the round
    deleted: torch.Tensor  # indices deleted from the bin


def needs_round(held: int, budget: int | None, buffer: int) -> bool:
    """Whether a layer holding `held` rows is due a round: it holds `budget + buffer` (and more
    than its budget)."""
    return budget is not None and held > budget and held >= budget + buffer


def held_bound(budget: int | None, buffer: int) -> int | None:
    """The most rows a layer with this budget holds between two rounds: budget + buffer (a
    one-token step appends before its round, so at least budget + 1). None: it only grows."""
    return None if budget is None else budget + max(buffer, 1)


class Rounds:
    """Runs the rounds that are due, for `layers` and their `asides` (`LayerAside`s)."""

    def __init__(self, layers, asides, policy, log: EventLog) -> None:
        self.layers, self.asides, self.policy, self.log = layers, asides, policy, log

    def run(self, step: int, stage: str) -> None:
        """A round in every layer that needs one (all of them, if the representative layer does)."""
        rep = representative_layer(self.policy)
        buffer = self.policy.buffer
        if rep is not None:
            layer = self.layers[rep]
            if needs_round(layer.held, layer.budget, buffer):
                decision = self.round(rep, step, stage)
                for other in range(len(self.layers)):
                    if other != rep:
                        self.round(other, step, stage, decision)
            return
        for idx, layer in enumerate(self.layers):
            if needs_round(layer.held, layer.budget, buffer):
                self.round(idx, step, stage)

    def round(self, layer_idx: int, step: int, stage: str, follow: RoundDecision | None = None) -> RoundDecision | None:
        """Bring a layer back to its budget: evict (to the bin), restore, delete from the bin."""
        policy, layer, aside = self.policy, self.layers[layer_idx], self.asides[layer_idx]
        if layer.budget is None:
            return None
        n = layer.held
        sink, recent = policy.protected(min(layer.budget, n))
        pool = n - sink - recent
        with_bin = recycle_bin(policy)
        binned = len(aside.bin) if with_bin else 0
        device = layer.keys.device
        if follow is None:
            view = LayerView.of(layer, aside)
            priority = policy.priority(view)[..., sink : n - recent]
            if binned:
                priority = torch.cat([priority, with_bin.bin_priority(view).to(device)], dim=-1)
            chosen = best(priority, max(0, layer.budget - sink - recent))
        else:
            candidates = _pool_index(layer, aside.bin, sink, n - recent, binned)
            chosen = torch.isin(candidates, follow.kept.to(device)).nonzero().squeeze(-1)

        kept_index = None  # what a representative layer tells the others
        if follow is None and chosen.dim() == 1 and layer_idx == representative_layer(policy):
            kept_index = _pool_index(layer, aside.bin, sink, n - recent, binned)[chosen]

        if with_bin is None:
            keep = torch.cat([_rows_range(0, sink, chosen), sink + chosen, _rows_range(n - recent, n, chosen)], dim=-1)
            before = count_modalities(layer.modality)
            layer.compact(keep)
            self.log.record_counts(step, layer_idx, stage, "evicted", before - count_modalities(layer.modality))
            if kept_index is None:
                return None
            return RoundDecision(kept_index, torch.empty(0, dtype=torch.int64))

        restored = chosen[chosen >= pool] - pool
        evicted = sink + complement(chosen[chosen < pool], pool)
        aside.bin.age()
        if aside.reserve.active:  # a conversation's image tokens wait in the reserve for a later question
            image = layer.modality[0][evicted] == Modality.IMAGE
            if bool(image.any()):
                leaving = layer.token_index[0][evicted[~image]]
                reserved = move_to_reserve(layer, aside, evicted[image])
                self.log.record(step, layer_idx, stage, "reserved", reserved.modality)
                evicted = torch.isin(layer.token_index[0], leaving).nonzero().squeeze(-1)
        binned, back = swap_with_bin(layer, aside.bin, evicted, restored)
        self.log.record(step, layer_idx, stage, "binned", binned.modality)
        if restored.numel():
            self.log.record(step, layer_idx, stage, "restored", back.modality)
        deleted = self._trim_bin(layer_idx, with_bin, step, stage, follow)
        if kept_index is None:
            return None
        return RoundDecision(kept_index, deleted)

    def _trim_bin(self, layer_idx: int, policy, step: int, stage: str, follow: RoundDecision | None) -> torch.Tensor:
        """Delete bin tokens past their rounds, then the lowest while over capacity; returns their indices."""
        layer, aside = self.layers[layer_idx], self.asides[layer_idx]
        bin_ = aside.bin
        if follow is not None:
            doomed = torch.isin(bin_.token_index, follow.deleted.cpu()).nonzero().squeeze(-1)
        else:
            expired = bin_.rounds >= policy.bin_ttl
            excess = len(bin_) - int(expired.sum()) - policy.bin_capacity(layer.budget)
            if excess > 0:
                priority = policy.bin_priority(LayerView.of(layer, aside)).cpu().masked_fill(expired, float("-inf"))
                candidates = torch.sort(priority, stable=True).indices
                candidates = candidates[~expired[candidates]][:excess]
                expired = expired.clone()
                expired[candidates] = True
            doomed = expired.nonzero().squeeze(-1)
        index = bin_.token_index[doomed]
        if doomed.numel():
            self.log.record(step, layer_idx, stage, "deleted", bin_.delete(doomed))
        return index


def swap_with_bin(layer, bin_: RecycleBin, evict: torch.Tensor, restore: torch.Tensor) -> tuple[TokenRows, TokenRows]:
    """Move a layer's rows `evict` (`[n]`) to its bin and bin tokens `restore` (`[m]`, indices
    before this call) back, at their original index, rebuilding the layer once. The bin then holds
    its old tokens but the restored, then the evicted. Returns (evicted, restored)."""
    evict = evict.to(layer.device)
    evicted = layer.take(evict)
    restored = bin_.take(restore, layer.device) if restore.numel() else layer.take(evict[:0])
    if evict.numel() or restore.numel():
        layer.compact(complement(evict, layer.held), restored)
    bin_.add(evicted)
    return evicted, restored


def evict_to_bin(layer, bin_: RecycleBin, index: torch.Tensor) -> TokenRows:
    """Move rows `index` (`[n]`, the same in every head) to the bin; returns them."""
    return swap_with_bin(layer, bin_, index, index[:0])[0]


def restore(layer, bin_: RecycleBin, bin_index: torch.Tensor) -> TokenRows:
    """Put bin tokens `bin_index` back, at their original index; returns them."""
    return swap_with_bin(layer, bin_, bin_index[:0], bin_index)[1]


def _pool_index(layer, bin_: RecycleBin, start: int, stop: int, binned: int) -> torch.Tensor:
    """Token indices of the round's candidates: unprotected active rows, then the bin."""
    active = layer.token_index[0, start:stop]
    if not binned:
        return active
    return torch.cat([active, bin_.token_index.to(active.device)])


def best(priority: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` highest priorities (ties: earlier first), ascending; per row if 2-D."""
    size = priority.shape[-1]
    if count >= size:
        index = torch.arange(size, device=priority.device)
        return index if priority.dim() == 1 else index.expand(priority.shape[0], size)
    order = torch.sort(priority, dim=-1, descending=True, stable=True).indices
    return complement(order[..., count:], size)


def _rows_range(start: int, stop: int, like: torch.Tensor) -> torch.Tensor:
    """`arange(start, stop)` shaped like `like` (`[n]`, or `[H, n]` repeated per head)."""
    rows = torch.arange(start, stop, device=like.device)
    return rows if like.dim() == 1 else rows.expand(like.shape[0], -1)
