"""EvictingCache: a transformers `Cache` of `EvictingLayer`s, driven by a policy.

The generation loop tells the cache what each forward carries (`begin_tokens`) and when a
step ends (`end_step`); the decoder loop calls `after_layer` between layers. In between,
`update` appends each layer's rows and marks the cache active, so the "hae_sdpa" attention
function lets it observe the attention rows its policy asked for. The policy decides; the
cache compacts, keeps the recycle bin, and records events and the time all this takes.

Under transformers' own `generate` nobody calls `begin_tokens` / `end_step` / `after_layer`:
the cache then takes positions from the `position_ids` the model passes (else continues
from `next_position`), tags the first forward's tokens text and later ones generated,
applies prefill decisions to every layer once the forward is done (no hidden-state pruning,
so no prefill compute is saved), and ends the step itself after the last layer's attention
(or, with plain "sdpa", when the next forward starts).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache

from hae_cli.cache.attention import (
    ValueRequest,
    decayed_attention,
    set_active,
    summarize_attention,
    what_if_attention,
)
from hae_cli.cache.layer import EvictingLayer, complement
from hae_cli.cache.modality import MODALITY_NAMES, Modality
from hae_cli.cache.policies import Policy, Rows, make_policy
from hae_cli.cache.stats import CacheStats, EvictionEvent, LayerStats

_PER_HEAD_ROWS = "per-head"  # a layer whose rows of this forward differ per head


@dataclass
class _Forward:
    """The tokens of the forward in progress and how far they got."""

    positions: torch.Tensor  # [q] int64
    modality: torch.Tensor  # [q] int8
    image_id: torch.Tensor  # [q] int16
    overview: torch.Tensor  # [q] bool: an image's global-view features (prefill decisions only)
    explicit: bool  # announced by begin_tokens (the caller will call end_step)
    rows: torch.Tensor | None = None  # forward tokens the next layer receives (None: all)
    layer_rows: dict = field(default_factory=dict)  # layer -> forward tokens it holds (None: all)
    observations: dict = field(default_factory=dict)  # layer -> {name: AttentionSummary}
    decided: set = field(default_factory=set)  # layers whose prefill decision was taken

    @property
    def count(self) -> int:
        return self.positions.numel()

    def tokens(self, rows: torch.Tensor | None) -> torch.Tensor:
        return torch.arange(self.count, device=self.positions.device) if rows is None else rows

    def to(self, device: torch.device) -> None:
        """Move the tags next to the K/V once, rather than at every layer."""
        self.positions, self.modality = self.positions.to(device), self.modality.to(device)
        self.image_id, self.overview = self.image_id.to(device), self.overview.to(device)
        self.rows = None if self.rows is None else self.rows.to(device)

    def tags(self, rows: torch.Tensor | None):
        """What a layer stores per row: positions, modality, image id."""
        if rows is None:
            return self.positions, self.modality, self.image_id
        return self.positions[rows], self.modality[rows], self.image_id[rows]


@dataclass(frozen=True)
class _RoundDecision:
    """A round at the representative layer, in positions, so other layers can follow it."""

    kept: torch.Tensor  # positions of unprotected tokens active after the round
    deleted: torch.Tensor  # positions deleted from the bin


class EvictingCache(Cache):
    """A KV cache that evicts according to `policy` (a `Policy` or a policy name + params).

    `EvictingCache("hae", num_layers=32, budget=0.5)`, `EvictingCache(policy, 32)` or
    `EvictingCache.from_config(model.config, "h2o", budget=256)`.
    """

    def __init__(
        self,
        policy: Policy | str = "full",
        num_layers: int | None = None,
        *,
        config=None,
        record_history: bool = False,
        sync_timing: bool = False,
        **params,
    ) -> None:
        if isinstance(policy, str):
            policy = make_policy(policy, **params)
        elif params:
            raise TypeError(f"parameters {sorted(params)} given with a policy object")
        if num_layers is None:
            if config is None:
                raise TypeError("EvictingCache needs num_layers or a model config")
            num_layers = _num_layers(config)
        policy.bind(num_layers)
        super().__init__(layers=[EvictingLayer(i) for i in range(num_layers)])
        self.policy = policy
        self.num_layers = num_layers
        self.next_position = 0  # tokens ever fed: the position of the next token
        self.image_sizes: list[int] = []  # slots fed of image k at index k-1
        self.step = 0  # 0 = prefill; +1 per decode step
        self.events: list[EvictionEvent] = []
        self._pending_events: list = []
        self.overhead_seconds = {"observe": 0.0, "prefill": 0.0, "scores": 0.0, "rounds": 0.0}
        self.history: list[CacheStats] | None = [] if record_history else None
        self.sync_timing = sync_timing  # synchronise CUDA around timed regions (exact, slower)
        self._forward: _Forward | None = None

    @classmethod
    def from_config(cls, config, policy: Policy | str = "full", **kwargs) -> "EvictingCache":
        return cls(policy, _num_layers(config), **kwargs)

    @property
    def eviction_seconds(self) -> float:
        """Time spent observing attention, deciding, compacting and moving bin tokens."""
        return sum(self.overhead_seconds.values())

    # --- the generation loop's side ---

    def begin_tokens(
        self,
        positions: torch.Tensor,
        modality: torch.Tensor | None = None,
        image_id: torch.Tensor | None = None,
        overview: torch.Tensor | None = None,
    ) -> None:
        """Announce the next forward's tokens: absolute positions `[q]` and their tags
        (`overview`: which are an image's global-view features, for prefill decisions)."""
        self._settle()
        if self._forward is not None:
            raise RuntimeError("begin_tokens: the previous forward did not reach every layer")
        positions = positions.reshape(-1).long()
        self._forward = self._new_forward(positions, modality, image_id, explicit=True, overview=overview)

    def end_step(self) -> None:
        """Close the forward: pending prefill decisions, budgets, decode rounds; step += 1."""
        fwd = self._forward
        if fwd is None:
            return
        if len(fwd.layer_rows) != self.num_layers:
            raise RuntimeError(f"end_step: only {len(fwd.layer_rows)} of {self.num_layers} layers ran")
        start = self._clock()
        prefill = self.step == 0
        if prefill:
            for layer_idx in range(self.num_layers):
                if layer_idx not in fwd.decided:
                    self._prefill_decision(layer_idx, live=False)
            for layer_idx, layer in enumerate(self.layers):
                layer.budget = self.policy.resolve_budget(layer_idx, self.next_position, layer.held)
        middle = self._clock()
        self._fold_scores(due_only=True)
        folded = self._clock()
        self._rounds("prefill" if prefill else "decode")
        if prefill:  # the prompt-size storage goes; from now on each layer holds at most its bound
            for layer in self.layers:
                layer.limit_rows(self.policy.held_bound(layer.budget))
        end = self._clock()
        self.overhead_seconds["prefill"] += middle - start
        self.overhead_seconds["scores"] += folded - middle
        self.overhead_seconds["rounds"] += end - folded
        self._forward = None
        self._flush_events()
        if self.history is not None:
            self.history.append(self._snapshot(self.step))
        self.step += 1

    # --- transformers' side ---

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        fwd = self._forward
        if fwd is not None and layer_idx in fwd.layer_rows:  # a new forward began without end_step
            self._settle()
            if self._forward is not None:
                raise RuntimeError(f"layer {layer_idx} updated twice in one forward")
            fwd = None
        if fwd is None:
            fwd = self._forward = self._implicit_forward(key_states, kwargs)
        if fwd.positions.device != key_states.device:
            fwd.to(key_states.device)
        rows = fwd.rows
        expected = fwd.count if rows is None else rows.numel()
        if key_states.shape[2] != expected:
            raise ValueError(f"layer {layer_idx} got {key_states.shape[2]} new rows, expected {expected}")
        keys, values = self.layers[layer_idx].append(key_states, value_states, *fwd.tags(rows))
        fwd.layer_rows[layer_idx] = rows
        set_active(self, layer_idx)
        return keys, values

    def reset(self) -> None:
        """Empty the cache for a new sequence (the policy and its parameters stay)."""
        super().reset()
        self.next_position, self.step, self.events, self._pending_events = 0, 0, [], []
        self.image_sizes = []
        self.overhead_seconds = dict.fromkeys(self.overhead_seconds, 0.0)
        self.history = [] if self.history is not None else None
        self._forward = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        self._settle()
        return self.layers[layer_idx].held if layer_idx < len(self.layers) else 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        self._settle()
        return self.layers[layer_idx].get_mask_sizes(query_length)

    # --- the decoder loop's and the attention function's side ---

    def after_layer(self, layer_idx: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """Between layers at prefill: rows (of `hidden`) the next layers keep, or None."""
        fwd = self._forward
        if fwd is None or self.step != 0 or layer_idx in fwd.decided:
            return None
        start = self._clock()
        keep = self._prefill_decision(layer_idx, live=True)
        self._flush_events()
        self.overhead_seconds["prefill"] += self._clock() - start
        return keep

    def observe_attention(self, layer_idx, query, key, attention_mask, scaling: float) -> None:
        """Called by the attention function right after SDPA, with what SDPA saw."""
        fwd = self._forward
        if fwd is None or layer_idx not in fwd.layer_rows:
            return
        start = self._clock()
        layer = self.layers[layer_idx]
        layer.attention_scaling = scaling
        if self.step == 0:
            rows = self._rows(layer_idx)
            for name, request in self.policy.prefill_requests(layer_idx, rows).items():
                if isinstance(request, ValueRequest):
                    summary = layer.values[0][:, rows.past + request.rows.to(layer.values.device)].float()
                else:
                    summary = summarize_attention(query, key, attention_mask, scaling, request)
                fwd.observations.setdefault(layer_idx, {})[name] = summary
            request = self.policy.prefill_score_request(layer_idx, rows)
            if request is not None:
                summary = summarize_attention(query, key, attention_mask, scaling, request)
                layer.scores.add_(summary.sum_per_kv_head())
        elif self.policy.wants_decode_attention(layer_idx):
            layer.stash_queries(query[0], fwd.tags(fwd.layer_rows[layer_idx])[0])
        self.overhead_seconds["observe"] += self._clock() - start
        if not fwd.explicit and layer_idx == self.num_layers - 1 and len(fwd.layer_rows) == self.num_layers:
            self.end_step()

    # --- reporting ---

    def stats(self) -> CacheStats:
        """A snapshot after the last completed step (its events only; all are in `events`)."""
        return self._snapshot(max(self.step - 1, 0))

    def _snapshot(self, step: int) -> CacheStats:
        counts = _gather([self._modality_counts(layer) for layer in self.layers]).tolist()
        images = len(self.image_sizes)
        held = _gather([_image_counts(layer.image_id, images) for layer in self.layers]).tolist()
        binned = _gather([_image_counts(layer.bin.image_id, images) for layer in self.layers]).tolist()
        layers = [
            LayerStats(
                layer=idx,
                tokens_by_modality={MODALITY_NAMES[m]: int(round(counts[idx][m])) for m in Modality},
                tokens_held=layer.held,
                budget=layer.budget,
                bin_tokens=len(layer.bin),
                bytes_held=layer.bytes_held,
                bin_bytes=layer.bin.nbytes,
                tokens_by_image=[int(round(c)) for c in held[idx]] if images else [],
                bin_by_image=[int(round(c)) for c in binned[idx]] if images else [],
                bytes_allocated=layer.bytes_allocated,
            )
            for idx, layer in enumerate(self.layers)
        ]
        full = sum(self.next_position * layer.bytes_per_token for layer in self.layers)
        return CacheStats(step, layers, full, [e for e in self.events if e.step == step], list(self.image_sizes))

    # --- internals ---

    def _new_forward(self, positions, modality, image_id, explicit: bool, overview=None) -> _Forward:
        q = positions.numel()
        if modality is None:
            tag = Modality.TEXT if self.step == 0 else Modality.GENERATED
            modality = torch.full((q,), int(tag), dtype=torch.int8)
        if image_id is None:
            image_id = torch.zeros(q, dtype=torch.int16)
        if overview is None:
            overview = torch.zeros(q, dtype=torch.bool)
        self._count_image_slots(image_id.reshape(-1))
        modality = modality.reshape(-1).to(positions.device, torch.int8)
        image_id = image_id.reshape(-1).to(positions.device, torch.int16)
        overview = overview.reshape(-1).to(positions.device, torch.bool)
        if modality.numel() != q or image_id.numel() != q or overview.numel() != q:
            raise ValueError(
                f"begin_tokens: {q} positions but {modality.numel()} modality / {image_id.numel()} image / "
                f"{overview.numel()} overview tags"
            )
        self.next_position += q
        return _Forward(positions, modality, image_id, overview, explicit)

    def _count_image_slots(self, image_id: torch.Tensor) -> None:
        """Add this forward's slots per image to `image_sizes`, read from the tags as the caller
        made them (on the host for prompts and decode steps: no device sync)."""
        if not image_id.numel():
            return
        fed = torch.bincount(image_id.long().cpu()).tolist()[1:]
        self.image_sizes += [0] * max(0, len(fed) - len(self.image_sizes))
        for k, count in enumerate(fed):
            self.image_sizes[k] += count

    def _implicit_forward(self, key_states, kwargs) -> _Forward:
        q = key_states.shape[2]
        inner = kwargs.get("kwargs") if isinstance(kwargs.get("kwargs"), dict) else kwargs
        position_ids = inner.get("position_ids")
        if position_ids is not None and position_ids.shape[-1] == q:
            positions = position_ids.reshape(-1, q)[0].to(key_states.device).long()
        else:
            positions = torch.arange(self.next_position, self.next_position + q, device=key_states.device)
        return self._new_forward(positions, None, None, explicit=False)

    def _settle(self) -> None:
        """End a forward that reached every layer but was not ended (transformers' generate)."""
        fwd = self._forward
        if fwd is not None and len(fwd.layer_rows) == self.num_layers:
            self.end_step()

    def _rows(self, layer_idx: int) -> Rows:
        fwd = self._forward
        rows = fwd.layer_rows.get(layer_idx, fwd.rows)
        if isinstance(rows, str):
            raise RuntimeError(f"layer {layer_idx} was compacted per head; its rows are not shared")
        positions, modality, image_id = fwd.tags(rows)
        overview = fwd.overview if rows is None else fwd.overview[rows]
        past = self.layers[layer_idx].held - positions.numel()
        return Rows(positions, modality, image_id, past, self.next_position, self.num_layers, overview)

    def _prefill_decision(self, layer_idx: int, live: bool) -> torch.Tensor | None:
        """Ask the policy at `layer_idx`; compact; return the hidden rows to keep if live."""
        fwd = self._forward
        fwd.decided.add(layer_idx)
        observations = fwd.observations.pop(layer_idx, {})
        decision = self.policy.prefill_keep(layer_idx, self._rows(layer_idx), observations)
        if decision is None:
            return None
        here = fwd.tokens(fwd.layer_rows[layer_idx])
        keep = decision.keep.to(here.device)
        if keep.dim() == 2:
            if decision.broadcast or tuple(decision.layers) != (layer_idx,):
                raise ValueError("a per-head keep set can only compact its own layer")
            self._compact_per_head(layer_idx, keep)
            return None
        kept = here[keep]
        targets = set(decision.layers)
        if decision.broadcast and not live:  # nothing was pruned between layers: compact them now
            targets |= set(range(layer_idx + 1, self.num_layers))
        for target in sorted(targets):
            self._compact_forward_rows(target, kept)
        if not (decision.broadcast and live):
            return None
        dropped = complement(keep, here.numel())
        dropped_tags = fwd.modality[here[dropped]]
        for later in range(layer_idx + 1, self.num_layers):
            self._record(later, "prefill", "evicted", dropped_tags)  # never computed there
        fwd.rows = kept
        return keep

    def _compact_forward_rows(self, layer_idx: int, kept: torch.Tensor) -> None:
        """Keep, of this forward's rows in the layer, those whose token is in `kept`."""
        fwd, layer = self._forward, self.layers[layer_idx]
        if isinstance(fwd.layer_rows[layer_idx], str):
            raise RuntimeError(f"layer {layer_idx} was compacted per head; its rows are not shared")
        mine = fwd.tokens(fwd.layer_rows[layer_idx])
        survives = torch.isin(mine, kept)
        local = survives.nonzero().squeeze(-1)
        if local.numel() == mine.numel():
            return
        past = layer.held - mine.numel()
        self._record(layer_idx, "prefill", "evicted", fwd.modality[mine[~survives]])
        layer.compact(torch.cat([torch.arange(past, device=local.device), past + local]))
        fwd.layer_rows[layer_idx] = mine[local]

    def _compact_per_head(self, layer_idx: int, keep: torch.Tensor) -> None:
        layer = self.layers[layer_idx]
        n = self._forward.tokens(self._forward.layer_rows[layer_idx]).numel()
        past = layer.held - n
        if keep.shape[1] == n:
            return
        old = torch.arange(past, device=keep.device).expand(keep.shape[0], past)
        full_keep = torch.cat([old, past + keep], dim=1)
        dropped = complement(full_keep, layer.held)
        self._record(layer_idx, "prefill", "evicted", layer.modality.gather(1, dropped))
        layer.compact(full_keep)
        self._forward.layer_rows[layer_idx] = _PER_HEAD_ROWS

    def flush_scores(self) -> None:
        """Bring every running score up to date now (they are otherwise folded when due)."""
        self._fold_scores(due_only=False)

    def _fold_scores(self, due_only: bool) -> None:
        """Fold stashed decode queries into the running scores of the active and binned tokens.

        Due when a layer has stashed `buffer` queries or needs a round. Nothing is evicted
        between two folds, so this equals updating the scores at every step.
        """
        policy = self.policy
        for layer in self.layers:
            if not layer.stashed:
                continue
            due = layer.stashed >= max(1, policy.buffer) or policy.needs_round(layer.held, layer.budget)
            if due or not due_only:
                self._fold(layer)

    def _fold(self, layer: EvictingLayer) -> None:
        decay = self.policy.score_decay
        queries, positions = layer.take_stash()
        seen, lse = decayed_attention(queries, positions, layer.keys, layer.positions, layer.attention_scaling, decay)
        factor = decay ** positions.numel()
        layer.scores.mul_(factor).add_(seen)
        if len(layer.bin):
            missed = what_if_attention(queries, lse, layer.bin.keys, layer.attention_scaling, decay)
            layer.bin.scores = factor * layer.bin.scores + missed.cpu()

    def _rounds(self, stage: str) -> None:
        rep = self.policy.representative_layer()
        if rep is not None:
            layer = self.layers[rep]
            if self.policy.needs_round(layer.held, layer.budget):
                decision = self._round(rep, stage)
                for other in range(self.num_layers):
                    if other != rep:
                        self._round(other, stage, decision)
            return
        for idx, layer in enumerate(self.layers):
            if self.policy.needs_round(layer.held, layer.budget):
                self._round(idx, stage)

    def _round(self, layer_idx: int, stage: str, follow: _RoundDecision | None = None) -> _RoundDecision | None:
        """Bring a layer back to its budget: evict (to the bin), restore, delete from the bin.

        Candidates are the unprotected active rows `[sink, n - recent)`, then the bin's tokens;
        the best `budget - sink - recent` of them by the policy's priority stay (or, following
        a representative layer, those at the positions it kept).
        """
        policy, layer = self.policy, self.layers[layer_idx]
        if layer.budget is None:
            return None
        n = layer.held
        sink, recent = policy.protected(min(layer.budget, n))
        pool = n - sink - recent
        binned = len(layer.bin) if policy.uses_bin else 0
        device = layer.keys.device
        if follow is None:
            priority = policy.priority(layer)[..., sink : n - recent]
            if binned:
                priority = torch.cat([priority, policy.bin_priority(layer).to(device)], dim=-1)
            chosen = _best(priority, max(0, layer.budget - sink - recent))
        else:
            candidates = self._pool_positions(layer, sink, n - recent, binned)
            chosen = torch.isin(candidates, follow.kept.to(device)).nonzero().squeeze(-1)

        kept_positions = None  # what a representative layer tells the others
        if follow is None and chosen.dim() == 1 and layer_idx == policy.representative_layer():
            kept_positions = self._pool_positions(layer, sink, n - recent, binned)[chosen]

        if not policy.uses_bin:
            keep = torch.cat([_rows_range(0, sink, chosen), sink + chosen, _rows_range(n - recent, n, chosen)], dim=-1)
            before = _count_tensor(layer.modality)
            layer.compact(keep)
            self._record_counts(layer_idx, stage, "evicted", before - _count_tensor(layer.modality))
            if kept_positions is None:
                return None
            return _RoundDecision(kept_positions, torch.empty(0, dtype=torch.int64))

        restored = chosen[chosen >= pool] - pool
        evicted = sink + complement(chosen[chosen < pool], pool)
        layer.bin.age()
        binned, back = layer.swap_with_bin(evicted, restored)
        self._record(layer_idx, stage, "binned", binned.modality)
        if restored.numel():
            self._record(layer_idx, stage, "restored", back.modality)
        deleted_positions = self._trim_bin(layer_idx, stage, follow)
        if kept_positions is None:
            return None
        return _RoundDecision(kept_positions, deleted_positions)

    def _pool_positions(self, layer, start: int, stop: int, binned: int) -> torch.Tensor:
        """Positions of the round's candidates: unprotected active rows, then the bin."""
        active = layer.positions[0, start:stop]
        if not binned:
            return active
        return torch.cat([active, layer.bin.positions.to(active.device)])

    def _trim_bin(self, layer_idx: int, stage: str, follow: _RoundDecision | None) -> torch.Tensor:
        """Delete bin tokens past their rounds, then the lowest while over capacity."""
        policy, layer = self.policy, self.layers[layer_idx]
        bin_ = layer.bin
        if follow is not None:
            doomed = torch.isin(bin_.positions, follow.deleted.cpu()).nonzero().squeeze(-1)
        else:
            expired = bin_.rounds >= policy.bin_ttl
            excess = len(bin_) - int(expired.sum()) - policy.bin_capacity(layer.budget)
            if excess > 0:
                priority = policy.bin_priority(layer).cpu().masked_fill(expired, float("-inf"))
                candidates = torch.sort(priority, stable=True).indices
                candidates = candidates[~expired[candidates]][:excess]
                expired = expired.clone()
                expired[candidates] = True
            doomed = expired.nonzero().squeeze(-1)
        positions = bin_.positions[doomed]
        if doomed.numel():
            self._record(layer_idx, stage, "deleted", bin_.delete(doomed))
        return positions

    def _record(self, layer_idx: int, stage: str, action: str, modality: torch.Tensor) -> None:
        """Note an event on tokens with these tags (read in one go by `_flush_events`: one sync)."""
        self._record_counts(layer_idx, stage, action, _count_tensor(modality))

    def _record_counts(self, layer_idx: int, stage: str, action: str, counts: torch.Tensor) -> None:
        self._pending_events.append((self.step, layer_idx, stage, action, counts))

    def _flush_events(self) -> None:
        if not self._pending_events:
            return
        counts = _gather([pending[-1] for pending in self._pending_events]).tolist()
        for (step, layer_idx, stage, action, _), values in zip(self._pending_events, counts):
            by_name = {MODALITY_NAMES[m]: int(round(values[m])) for m in Modality}
            if any(by_name.values()):
                self.events.append(EvictionEvent(step, layer_idx, stage, action, by_name))
        self._pending_events = []

    def _modality_counts(self, layer: EvictingLayer) -> torch.Tensor:
        if layer.modality is None:
            return torch.zeros(len(Modality))
        return _count_tensor(layer.modality)

    def _clock(self) -> float:
        if self.sync_timing and torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()


def _count_tensor(modality: torch.Tensor) -> torch.Tensor:
    """Tokens per modality, `[4]` float (for `[H, n]` tags the mean over heads), without a sync."""
    return _count_values(modality, 0, len(Modality))


def _image_counts(image_id: torch.Tensor | None, images: int) -> torch.Tensor:
    """Tokens of images 1..`images`, `[images]` float (for `[H, n]` tags the mean over heads)."""
    if image_id is None or not images:
        return torch.zeros(images)
    return _count_values(image_id, 1, images + 1)


def _count_values(tags: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """How many tags equal each of `start..stop-1`, float (`[H, n]` tags: the mean over heads)."""
    tags = tags.long()
    if tags.dim() == 1:
        tags = tags[None]
    one_hot = tags[..., None] == torch.arange(start, stop, device=tags.device)
    return one_hot.sum(dim=1).float().mean(dim=0)


def _gather(counts: list[torch.Tensor]) -> torch.Tensor:
    """Stack small count tensors on one device and copy them to the host once."""
    if not counts:
        return torch.zeros(0, len(Modality))
    device = next((c.device for c in counts if c.device.type != "cpu"), torch.device("cpu"))
    return torch.stack([c.float().to(device) for c in counts]).cpu()


def _best(priority: torch.Tensor, count: int) -> torch.Tensor:
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


def _num_layers(config) -> int:
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    return int(config.num_hidden_layers)
