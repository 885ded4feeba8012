"""Decode rounds: a layer that holds `budget + buffer` tokens is brought back to its budget.

Candidates are the unprotected active rows `[sink, n - recent)`, then the recycle bin's
tokens; the best `budget - sink - recent` of them by the policy's priority stay active. The
rest of the active ones go to the bin (or are evicted for good without one), the chosen bin
tokens come back at their original index, and the bin is trimmed (age, then capacity). With a
representative layer, its choice (in token indices) is followed by every other layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hae_cli.cache.layer import complement
from hae_cli.cache.modality import Modality
from hae_cli.cache.policies import LayerView
from hae_cli.cache.reporting import EventLog, count_modalities


@dataclass(frozen=True)
class RoundDecision:
    """A round at the representative layer, in token indices, so other layers can follow it."""

    kept: torch.Tensor  # indices of unprotected tokens active after the round
    deleted: torch.Tensor  # indices deleted from the bin


class Rounds:
    def __init__(self, layers, policy, log: EventLog) -> None:
        self.layers, self.policy, self.log = layers, policy, log

    def run(self, step: int, stage: str) -> None:
        """A round in every layer that needs one (all of them, if the representative layer does)."""
        rep = self.policy.representative_layer()
        if rep is not None:
            layer = self.layers[rep]
            if self.policy.needs_round(layer.held, layer.budget):
                decision = self.round(rep, step, stage)
                for other in range(len(self.layers)):
                    if other != rep:
                        self.round(other, step, stage, decision)
            return
        for idx, layer in enumerate(self.layers):
            if self.policy.needs_round(layer.held, layer.budget):
                self.round(idx, step, stage)

    def round(self, layer_idx: int, step: int, stage: str, follow: RoundDecision | None = None) -> RoundDecision | None:
        """Bring a layer back to its budget: evict (to the bin), restore, delete from the bin."""
        policy, layer = self.policy, self.layers[layer_idx]
        if layer.budget is None:
            return None
        n = layer.held
        sink, recent = policy.protected(min(layer.budget, n))
        pool = n - sink - recent
        binned = len(layer.bin) if policy.uses_bin else 0
        device = layer.keys.device
        if follow is None:
            view = LayerView.of(layer)
            priority = policy.priority(view)[..., sink : n - recent]
            if binned:
                priority = torch.cat([priority, policy.bin_priority(view).to(device)], dim=-1)
            chosen = best(priority, max(0, layer.budget - sink - recent))
        else:
            candidates = _pool_index(layer, sink, n - recent, binned)
            chosen = torch.isin(candidates, follow.kept.to(device)).nonzero().squeeze(-1)

        kept_index = None  # what a representative layer tells the others
        if follow is None and chosen.dim() == 1 and layer_idx == policy.representative_layer():
            kept_index = _pool_index(layer, sink, n - recent, binned)[chosen]

        if not policy.uses_bin:
            keep = torch.cat([_rows_range(0, sink, chosen), sink + chosen, _rows_range(n - recent, n, chosen)], dim=-1)
            before = count_modalities(layer.modality)
            layer.compact(keep)
            self.log.record_counts(step, layer_idx, stage, "evicted", before - count_modalities(layer.modality))
            if kept_index is None:
                return None
            return RoundDecision(kept_index, torch.empty(0, dtype=torch.int64))

        restored = chosen[chosen >= pool] - pool
        evicted = sink + complement(chosen[chosen < pool], pool)
        layer.bin.age()
        if layer.reserve_active:  # a conversation's image tokens wait in the reserve for a later question
            image = layer.modality[0][evicted] == Modality.IMAGE
            if bool(image.any()):
                leaving = layer.token_index[0][evicted[~image]]
                self.log.record(step, layer_idx, stage, "reserved", layer.move_to_reserve(evicted[image]).modality)
                evicted = torch.isin(layer.token_index[0], leaving).nonzero().squeeze(-1)
        binned, back = layer.swap_with_bin(evicted, restored)
        self.log.record(step, layer_idx, stage, "binned", binned.modality)
        if restored.numel():
            self.log.record(step, layer_idx, stage, "restored", back.modality)
        deleted = self._trim_bin(layer_idx, step, stage, follow)
        if kept_index is None:
            return None
        return RoundDecision(kept_index, deleted)

    def _trim_bin(self, layer_idx: int, step: int, stage: str, follow: RoundDecision | None) -> torch.Tensor:
        """Delete bin tokens past their rounds, then the lowest while over capacity; returns their indices."""
        policy, layer = self.policy, self.layers[layer_idx]
        bin_ = layer.bin
        if follow is not None:
            doomed = torch.isin(bin_.token_index, follow.deleted.cpu()).nonzero().squeeze(-1)
        else:
            expired = bin_.rounds >= policy.bin_ttl
            excess = len(bin_) - int(expired.sum()) - policy.bin_capacity(layer.budget)
            if excess > 0:
                priority = policy.bin_priority(LayerView.of(layer)).cpu().masked_fill(expired, float("-inf"))
                candidates = torch.sort(priority, stable=True).indices
                candidates = candidates[~expired[candidates]][:excess]
                expired = expired.clone()
                expired[candidates] = True
            doomed = expired.nonzero().squeeze(-1)
        index = bin_.token_index[doomed]
        if doomed.numel():
            self.log.record(step, layer_idx, stage, "deleted", bin_.delete(doomed))
        return index


def _pool_index(layer, start: int, stop: int, binned: int) -> torch.Tensor:
    """Token indices of the round's candidates: unprotected active rows, then the bin."""
    active = layer.token_index[0, start:stop]
    if not binned:
        return active
    return torch.cat([active, layer.bin.token_index.to(active.device)])


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
