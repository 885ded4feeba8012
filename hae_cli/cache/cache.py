"""EvictingCache: a transformers `Cache` of `EvictingLayer`s, driven by a policy.

The generation loop tells the cache what each forward carries (`begin_tokens`) and when a
step ends (`end_step`); the decoder loop calls `after_layer` between layers. In between,
`update` appends each layer's rows and marks the cache active, so the "hae_sdpa" attention
function lets it observe the attention rows its policy asked for. The policy decides; the
parts of the cache act on it, one module each: what is observed and how scores are folded
(`observation.py`), prefill compaction (`prefill.py`), decode rounds with the recycle bin
(`rounds.py`), events, timing and snapshots (`reporting.py`).

Each token is known by its index in feed order (`tokens_fed` counts them); the rotary
position the model gives it never reaches the cache, so a model whose positions repeat or
have several rows (multimodal RoPE) is cached like any other.

Under transformers' own `generate` nobody calls `begin_tokens` / `end_step` / `after_layer`:
the cache then tags the first forward's tokens text and later ones generated, applies prefill
decisions to every layer once the forward is done (no hidden-state pruning, so no prefill
compute is saved), and ends the step itself after the last layer's attention (or, with plain
"sdpa", when the next forward starts).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from hae_cli.cache.attention import register_attention, set_active
from hae_cli.cache.forward import ForwardTokens, new_forward
from hae_cli.cache.layer import GROWTH_ROWS, EvictingLayer, same_in_every_head
from hae_cli.cache.modality import Modality
from hae_cli.cache.observation import fold, fold_scores, observe_prefill
from hae_cli.cache.policies import Policy, make_policy
from hae_cli.cache.prefill import PrefillCompaction
from hae_cli.cache.question import observe_question, swap_for_question, take_back
from hae_cli.cache.reporting import EventLog, Stopwatch, count_modalities, snapshot
from hae_cli.cache.rounds import Rounds
from hae_cli.cache.static_step import StaticStep
from hae_cli.cache.stats import CacheStats


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
        register_attention()
        super().__init__(layers=[EvictingLayer(i) for i in range(num_layers)])
        self.policy = policy
        self.num_layers = num_layers
        self.tokens_fed = 0  # tokens ever fed: the index of the next token
        self.image_sizes: list[int] = []  # slots fed of image k at index k-1
        self.step = 0  # 0 = prefill; +1 per decode step
        self.log = EventLog()
        self.stopwatch = Stopwatch(sync_timing)
        self.history: list[CacheStats] | None = [] if record_history else None
        self._prefill = PrefillCompaction(self.layers, policy, self.log)
        self._rounds = Rounds(self.layers, policy, self.log)
        self._forward: ForwardTokens | None = None
        self._static: StaticStep | None = None  # what a compiled decode step reads and writes

    @classmethod
    def from_config(cls, config, policy: Policy | str = "full", **kwargs) -> "EvictingCache":
        return cls(policy, _num_layers(config), **kwargs)

    @property
    def events(self):
        """Every eviction event so far (`EvictionEvent`s)."""
        return self.log.events

    @property
    def overhead_seconds(self) -> dict[str, float]:
        """Eviction work by part: observe, prefill, scores, rounds."""
        return self.stopwatch.seconds

    @property
    def eviction_seconds(self) -> float:
        """Time spent observing attention, deciding, compacting and moving bin tokens."""
        return self.stopwatch.total

    # --- the generation loop's side ---

    def begin_tokens(
        self,
        modality: torch.Tensor,
        image_id: torch.Tensor | None = None,
        overview: torch.Tensor | None = None,
        probe: bool = False,
    ) -> None:
        """Announce the next forward's tokens by their tags, `[q]` each (`overview`: which are an
        image's global-view features, for prefill decisions). They are indexed from `tokens_fed` on.
        The first forward, and any later one that carries images, is compressed as a prefill.
        `probe`: a new turn's question, fed to be scored and taken back by `end_probe`."""
        self._settle()
        if self._forward is not None:
            raise RuntimeError("begin_tokens: the previous forward did not reach every layer")
        self._forward = self._new_forward(modality.numel(), modality, image_id, overview, explicit=True)
        self._forward.probe = probe
        self._forward.compresses = not probe and (self.step == 0 or bool((self._forward.modality == Modality.IMAGE).any()))

    def end_step(self) -> None:
        """Close the forward: pending prefill decisions, budgets, decode rounds; step += 1."""
        fwd = self._forward
        if fwd is None:
            return
        if len(fwd.layer_rows) != self.num_layers:
            raise RuntimeError(f"end_step: only {len(fwd.layer_rows)} of {self.num_layers} layers ran")
        if fwd.probe:
            raise RuntimeError("end_step: a probe ends with end_probe")
        clock = self.stopwatch
        start = clock.now()
        prefill = fwd.compresses
        if prefill:
            self._prefill.step = self.step
            for layer_idx in range(self.num_layers):
                if layer_idx not in fwd.decided:
                    self._prefill.decide(fwd, layer_idx, live=False, tokens_fed=self.tokens_fed)
            self._prefill.finish(fwd, self.step)
            for layer_idx, layer in enumerate(self.layers):
                layer.budget = self.policy.resolve_budget(layer_idx, self.tokens_fed, layer.held)
        clock.add("prefill", start)
        self._forward = None
        self._close_step(prefill)

    def _close_step(self, prefill: bool) -> None:
        """Fold the scores that are due, run the rounds that are due; step += 1."""
        clock = self.stopwatch
        start = clock.now()
        fold_scores(self.layers, self.policy, due_only=True)
        start = clock.add("scores", start)
        stage = "prefill" if prefill else "decode"
        self._rounds.run(self.step, stage)
        for layer_idx, layer in enumerate(self.layers):  # a sliding layer: what no later token can see
            dropped = layer.trim_to_window(self.tokens_fed)
            if dropped is not None:
                self.log.record_counts(self.step, layer_idx, stage, "evicted", count_modalities(dropped))
        if prefill:  # the prompt-size storage goes; from now on each layer holds at most its bound
            for layer in self.layers:
                layer.limit_rows(window_bound(self.policy.held_bound(layer.budget), layer.window))
        clock.add("rounds", start)
        self.log.flush()
        if self.history is not None:
            self.history.append(self.stats_at(self.step))
        self.step += 1

    # --- a compiled decode step's side (`hae_cli.model.compiled`) ---

    def set_windows(self, windows: list[int | None]) -> None:
        """Each layer's sliding window, as the decoder's rules say (None: it sees every token):
        from the end of the next step on, such a layer holds only what its window can see,
        under any policy."""
        if len(windows) != self.num_layers:
            raise ValueError(f"{len(windows)} windows for {self.num_layers} layers")
        for layer, window in zip(self.layers, windows):
            layer.window = window

    def forward_index(self) -> torch.Tensor | None:
        """The feed-order index of each token of the forward in progress (None: none announced)."""
        return None if self._forward is None else self._forward.index

    def held_index(self, layer_idx: int) -> torch.Tensor:
        """`[1 or H_kv, held]`: the index of each row a layer holds (one row where every head
        holds the same tokens)."""
        index = self.layers[layer_idx].token_index
        if index is None:
            return torch.empty(1, 0, dtype=torch.int64)
        return index[:1] if same_in_every_head(index) else index

    def make_room(self, new_tokens: int) -> None:
        """Storage for `new_tokens` more rows in every layer without a bound (a layer with one
        never holds more than `budget + buffer` between rounds), so that a compiled step's shapes
        stay fixed while decoding them."""
        for layer in self.layers:
            if layer.row_bound is None:
                layer.make_room(layer.held + new_tokens + 1)

    def begin_static_step(self, query_shape: tuple[int, int]) -> StaticStep:
        """Ready the cache for one generated token fed by a compiled step; returns the step's view
        of the storage (`query_shape`: the model's query heads and head size, for the rings)."""
        self._settle()
        if self._forward is not None:
            raise RuntimeError("begin_static_step: a forward is in progress")
        if self.step == 0:
            raise RuntimeError("begin_static_step: the prompt must be fed first")
        for layer in self.layers:
            if layer.held >= layer.capacity:  # only a layer without a bound can be full here
                layer.make_room(layer.held + GROWTH_ROWS)
        if self._static is None:
            stashing = [self.policy.wants_decode_attention(i) for i in range(self.num_layers)]
            self._static = StaticStep(self.layers, stashing, max(1, self.policy.buffer), query_shape)
        self._static.refresh(self.layers, self.tokens_fed)
        return self._static

    def end_static_step(self) -> None:
        """After a compiled step: mirror what it did, then fold, run the rounds; step += 1."""
        self._static.advanced(self.layers)
        self.tokens_fed += 1
        self._close_step(prefill=False)
        for layer in self.layers:  # a full ring is folded now: the next step has no slot for its query
            ring = layer.stash.ring
            if ring is not None and ring.filled >= ring.size:
                fold(layer, self.policy.score_decay)

    def abandon_static_step(self) -> None:
        """A compiled step that failed: its device counts are set again from the host next time."""
        if self._static is not None:
            self._static.held_host = [-1] * self.num_layers

    def wants_question_probe(self) -> bool:
        """Whether a new turn's question is first fed as a probe (`begin_tokens(probe=True)`)."""
        return self.policy.wants_question_probe()

    def end_probe(self) -> None:
        """Close a probe: take its rows back out of every layer (as if never fed), then let the
        policy swap what the question asked for into the held rows (`turn_swap`)."""
        fwd = self._forward
        if fwd is None or not fwd.probe:
            raise RuntimeError("end_probe: no probe is running")
        if len(fwd.layer_rows) != self.num_layers:
            raise RuntimeError(f"end_probe: only {len(fwd.layer_rows)} of {self.num_layers} layers ran")
        start = self.stopwatch.now()
        take_back(fwd, self.layers)
        self.tokens_fed -= fwd.count
        swap_for_question(fwd, self.layers, self.policy, self.log, self.step)
        self._forward = None
        self.log.flush()
        self.stopwatch.add("rounds", start)

    def flush_scores(self) -> None:
        """Bring every running score up to date now (they are otherwise folded when due)."""
        fold_scores(self.layers, self.policy, due_only=False)

    # --- transformers' side ---

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        fwd = self._forward
        if fwd is not None and layer_idx in fwd.layer_rows:  # a new forward began without end_step
            self._settle()
            if self._forward is not None:
                raise RuntimeError(f"layer {layer_idx} updated twice in one forward")
            fwd = None
        if fwd is None:
            fwd = self._forward = self._new_forward(key_states.shape[2], None, None, None, explicit=False)
        if fwd.index.device != key_states.device:
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
        self.tokens_fed, self.step, self.image_sizes = 0, 0, []
        self.log = EventLog()
        self.stopwatch = Stopwatch(self.stopwatch.sync)
        self.history = [] if self.history is not None else None
        self._prefill = PrefillCompaction(self.layers, self.policy, self.log)
        self._rounds = Rounds(self.layers, self.policy, self.log)
        self._forward = None
        self._static = None

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
        if fwd is None or not fwd.compresses or layer_idx in fwd.decided:
            return None
        start = self.stopwatch.now()
        self._prefill.step = self.step
        keep = self._prefill.decide(fwd, layer_idx, live=True, tokens_fed=self.tokens_fed)
        self.log.flush()
        self.stopwatch.add("prefill", start)
        return keep

    def observe_attention(self, layer_idx, query, key, attention_mask, scaling: float) -> None:
        """Called by the attention function right after SDPA, with what SDPA saw."""
        fwd = self._forward
        if fwd is None or layer_idx not in fwd.layer_rows:
            return
        start = self.stopwatch.now()
        layer = self.layers[layer_idx]
        layer.attention_scaling = scaling
        if fwd.probe:
            observe_question(fwd, layer, layer_idx, query, scaling)
        elif fwd.compresses:
            rows = fwd.policy_rows(layer_idx, layer.held, self.tokens_fed, self.num_layers)
            observations = fwd.observations.setdefault(layer_idx, {})
            observe_prefill(self.policy, layer, layer_idx, rows, observations, query, key, attention_mask, scaling)
        elif self.policy.wants_decode_attention(layer_idx):
            layer.stash_queries(query[0], fwd.tags(fwd.layer_rows[layer_idx])[0])
        self.stopwatch.add("observe", start)
        if not fwd.explicit and layer_idx == self.num_layers - 1 and len(fwd.layer_rows) == self.num_layers:
            self.end_step()

    # --- reporting ---

    def stats(self) -> CacheStats:
        """A snapshot after the last completed step (its events only; all are in `events`)."""
        return self.stats_at(max(self.step - 1, 0))

    def stats_at(self, step: int) -> CacheStats:
        return snapshot(self.layers, step, self.tokens_fed, self.image_sizes, self.log.events)

    # --- internals ---

    def _new_forward(self, count: int, modality, image_id, overview, explicit: bool) -> ForwardTokens:
        default = Modality.TEXT if self.step == 0 else Modality.GENERATED
        fwd = new_forward(count, self.tokens_fed, modality, image_id, overview, explicit, default)
        fwd.compresses = self.step == 0
        self._count_image_slots(fwd.image_id)
        self.tokens_fed += count
        return fwd

    def _count_image_slots(self, image_id: torch.Tensor) -> None:
        """Add this forward's slots per image to `image_sizes`, read from the tags as the caller
        made them (on the host for prompts and decode steps: no device sync)."""
        if not image_id.numel():
            return
        fed = torch.bincount(image_id.long().cpu()).tolist()[1:]
        self.image_sizes += [0] * max(0, len(fed) - len(self.image_sizes))
        for k, count in enumerate(fed):
            self.image_sizes[k] += count

    def _settle(self) -> None:
        """End a forward that reached every layer but was not ended (transformers' generate)."""
        fwd = self._forward
        if fwd is not None and len(fwd.layer_rows) == self.num_layers:
            self.end_step()


def window_bound(bound: int | None, window: int | None) -> int | None:
    """The most rows a layer holds between rounds: its policy's bound, and no more than its
    window (`window - 1` rows it may still need, and the step's own)."""
    if window is None:
        return bound
    return window if bound is None else min(bound, window)


def _num_layers(config) -> int:
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    return int(config.num_hidden_layers)
