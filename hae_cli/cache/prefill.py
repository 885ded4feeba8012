"""Prefill decisions: the policy says which of the prompt's rows a layer keeps; this compacts.

A decision is taken at each layer once its attention was observed: live, between layers,
when the decoder loop calls `after_layer` (a broadcast decision then also prunes the hidden
states, so later layers never compute the dropped rows), or after the forward for layers
nobody asked (transformers' own `generate`: the later layers are compacted then instead).
"""

from __future__ import annotations

import torch

from hae_cli.cache.forward import PER_HEAD_ROWS, ForwardTokens
from hae_cli.cache.indices import complement
from hae_cli.cache.reporting import EventLog
from hae_cli.cache.reserve import move_to_reserve


class PrefillCompaction:
    """Takes a layer's prefill decision and applies it to the layers it names."""

    def __init__(self, layers, asides, policy, log: EventLog) -> None:
        self.layers, self.asides, self.policy, self.log = layers, asides, policy, log
        self.step = 0  # the cache's step, for the events (set by the cache before each decision)

    def decide(self, fwd: ForwardTokens, layer_idx: int, live: bool, tokens_fed: int) -> torch.Tensor | None:
        """Ask the policy at `layer_idx` (`tokens_fed`: this forward's included); compact; return
        the hidden rows to keep if live."""
        fwd.decided.add(layer_idx)
        observations = fwd.observations.pop(layer_idx, {})
        rows = fwd.policy_rows(layer_idx, self.layers[layer_idx].held, tokens_fed, len(self.layers))
        decision = self.policy.prefill_keep(layer_idx, rows, observations)
        if decision is None:
            return None
        here = fwd.tokens(fwd.layer_rows[layer_idx])
        keep = decision.keep.to(here.device)
        if keep.dim() == 2:
            if decision.broadcast or tuple(decision.layers) != (layer_idx,):
                raise ValueError("a per-head keep set can only compact its own layer")
            self._compact_per_head(fwd, layer_idx, keep)
            return None
        kept = here[keep]
        if decision.protected is not None:
            protected = fwd.index[here[decision.protected.to(here.device)].to(fwd.index.device)].cpu()
            for aside in self.asides:
                aside.reserve.protected = torch.cat([aside.reserve.protected, protected])
        if decision.to_reserve:  # every layer computes the dropped rows: each sets them aside once it ran
            ran = [target for target in range(len(self.layers)) if target in fwd.layer_rows]
            for target in ran:
                self._compact_forward_rows(fwd, target, kept, to_reserve=True)
            if len(ran) < len(self.layers):
                fwd.reserve_kept, fwd.reserve_from = kept, len(ran)
            return None
        targets = set(decision.layers)
        if decision.broadcast and not live:  # nothing was pruned between layers: compact them now
            targets |= set(range(layer_idx + 1, len(self.layers)))
        for target in sorted(targets):
            self._compact_forward_rows(fwd, target, kept)
        if not (decision.broadcast and live):
            return None
        dropped = complement(keep, here.numel())
        dropped_tags = fwd.modality[here[dropped]]
        for later in range(layer_idx + 1, len(self.layers)):
            self.log.record(self.step, later, "prefill", "evicted", dropped_tags)  # never computed there
        fwd.rows = kept
        return keep

    def finish(self, fwd: ForwardTokens, step: int) -> None:
        """Apply a reserve decision to the layers that ran after it was taken."""
        if fwd.reserve_kept is None:
            return
        for target in range(fwd.reserve_from, len(self.layers)):
            self._compact_forward_rows(fwd, target, fwd.reserve_kept, to_reserve=True, step=step)
        fwd.reserve_kept = None

    def _compact_forward_rows(self, fwd: ForwardTokens, layer_idx: int, kept: torch.Tensor, to_reserve: bool = False,
                              step: int | None = None) -> None:
        """Keep, of this forward's rows in the layer, those whose token is in `kept`; the others are
        deleted, or set aside in the layer's reserve."""
        layer = self.layers[layer_idx]
        mine = fwd.tokens(fwd.shared_rows(layer_idx))
        survives = torch.isin(mine, kept)
        local = survives.nonzero().squeeze(-1)
        if local.numel() == mine.numel():
            return
        past = layer.held - mine.numel()
        step = self.step if step is None else step
        if to_reserve:
            dropped = past + (~survives).nonzero().squeeze(-1)
            reserved = move_to_reserve(layer, self.asides[layer_idx], dropped)
            self.log.record(step, layer_idx, "prefill", "reserved", reserved.modality)
        else:
            self.log.record(step, layer_idx, "prefill", "evicted", fwd.modality[mine[~survives]])
            layer.compact(torch.cat([torch.arange(past, device=local.device), past + local]))
        fwd.layer_rows[layer_idx] = mine[local]

    def _compact_per_head(self, fwd: ForwardTokens, layer_idx: int, keep: torch.Tensor) -> None:
        layer = self.layers[layer_idx]
        n = fwd.tokens(fwd.layer_rows[layer_idx]).numel()
        past = layer.held - n
        if keep.shape[1] == n:
            return
        old = torch.arange(past, device=keep.device).expand(keep.shape[0], past)
        full_keep = torch.cat([old, past + keep], dim=1)
        dropped = complement(full_keep, layer.held)
        self.log.record(self.step, layer_idx, "prefill", "evicted", layer.modality.gather(1, dropped))
        layer.compact(full_keep)
        fwd.layer_rows[layer_idx] = PER_HEAD_ROWS
