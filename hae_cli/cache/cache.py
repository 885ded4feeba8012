"""EvictingCache: a transformers `Cache` of `EvictingLayer`s, driven by a policy.

The generation loop tells the cache what each forward carries (`begin_tokens`) and when a
step ends (`end_step`); the decoder loop calls `after_layer` between layers. In between,
`update` appends each layer's rows through the layer's own `update` and marks the cache
active, so the "hae_sdpa" attention function lets it observe the attention rows its policy
asked for. Each layer's storage (`EvictingLayer`) has its bin, reserve and query stash beside
it (`LayerAside`, in `asides`). The policy decides; the parts of the cache act on it, one
module each: what is observed and how scores are folded (`observation.py`), prefill
compaction (`prefill.py`), decode rounds with the recycle bin (`rounds.py`), a new turn's
question (`question.py`), sliding windows (`window.py`), a compiled step's view
(`static_step.py`), events, timing and snapshots (`reporting.py`).

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

from hae_cli.cache.aside import LayerAside
from hae_cli.cache.attention import register_attention, set_active
from hae_cli.cache.forward import ForwardTokens, new_forward
from hae_cli.cache.layer import EvictingLayer
from hae_cli.cache.modality import Modality
from hae_cli.cache.observation import fold_scores, observe_prefill
from hae_cli.cache.policies import Policy, make_policy
from hae_cli.cache.policies.capabilities import keeps_decode_scores, probes_question
from hae_cli.cache.question import observe_question
from hae_cli.cache.reporting import EventLog, Stopwatch, add_image_slots, snapshot
from hae_cli.cache.static_step import StaticStep
from hae_cli.cache.stats import CacheStats
from hae_cli.cache.step_end import StepEnd


class EvictingCache(Cache):
    """A KV cache that evicts according to `policy` (a `Policy` or a policy name + params).

    `EvictingCache("hae", num_layers=32, budget=0.5)`, `EvictingCache(policy, 32)` or
    `EvictingCache.from_config(model.config, "h2o", budget=256)`.
    """

    def __init__(self, policy: Policy | str = "full", num_layers: int | None = None, *, config=None,
                 record_history: bool = False, sync_timing: bool = False, **params) -> None:
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
        self._begin_sequence(Stopwatch(sync_timing), record_history)

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

    def _begin_sequence(self, stopwatch: Stopwatch, record_history: bool) -> None:
        """The state of one sequence, from its first token on (`__init__`, `reset`)."""
        self.asides = [LayerAside() for _ in range(self.num_layers)]  # each layer's bin, reserve, stash
        self.tokens_fed = 0  # tokens ever fed: the index of the next token
        self.image_sizes: list[int] = []  # slots fed of image k at index k-1
        self.step = 0  # 0 = prefill; +1 per decode step
        self.log = EventLog()
        self.stopwatch = stopwatch
        self.history: list[CacheStats] | None = [] if record_history else None
        self._end = StepEnd(self.layers, self.asides, self.policy, self.log, stopwatch)
        self._forward: ForwardTokens | None = None
        self._static: StaticStep | None = None  # what a compiled decode step reads and writes

    # --- the generation loop's side ---

    def begin_tokens(self, modality: torch.Tensor, image_id: torch.Tensor | None = None,
                     overview: torch.Tensor | None = None, probe: bool = False) -> None:
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
        if fwd.compresses:
            self._end.prefill_done(fwd, self.step, self.tokens_fed)
        self._forward = None
        self._close_step(fwd.compresses)

    def _close_step(self, prefill: bool) -> None:
        """The step's folds, rounds and windows (`StepEnd`); step += 1."""
        self._end.step_done(self.step, self.tokens_fed, prefill)
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
        return self.layers[layer_idx].held_index()

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
        self._static = StaticStep.ready(self._static, self.layers, self.asides, self.policy, self.tokens_fed,
                                        query_shape)
        return self._static

    def end_static_step(self) -> None:
        """After a compiled step: mirror what it did, then fold, run the rounds; step += 1."""
        self._static.advanced(self.layers)
        self.tokens_fed += 1
        self._close_step(prefill=False)
        self._end.fold_full_rings()

    def abandon_static_step(self) -> None:
        """A compiled step that failed: its device counts are set again from the host next time."""
        if self._static is not None:
            self._static.held_host = [-1] * self.num_layers

    def wants_question_probe(self) -> bool:
        """Whether a new turn's question is first fed as a probe (`begin_tokens(probe=True)`)."""
        return probes_question(self.policy)

    def end_probe(self) -> None:
        """Close a probe: take its rows back out of every layer (as if never fed), then let the
        policy swap what the question asked for into the held rows (`turn_swap`)."""
        fwd = self._forward
        if fwd is None or not fwd.probe:
            raise RuntimeError("end_probe: no probe is running")
        if len(fwd.layer_rows) != self.num_layers:
            raise RuntimeError(f"end_probe: only {len(fwd.layer_rows)} of {self.num_layers} layers ran")
        self.tokens_fed -= fwd.count
        self._end.probe_done(fwd, self.step)
        self._forward = None

    def flush_scores(self) -> None:
        """Bring every running score up to date now (they are otherwise folded when due)."""
        fold_scores(self.layers, self.asides, self.policy, due_only=False)

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
        keys, values = self.layers[layer_idx].update(key_states, value_states, fwd.cache_kwargs(rows))
        fwd.layer_rows[layer_idx] = rows
        set_active(self, layer_idx)
        return keys, values

    def reset(self) -> None:
        """Empty the cache for a new sequence (the policy and its parameters stay)."""
        super().reset()
        self._begin_sequence(Stopwatch(self.stopwatch.sync), self.history is not None)

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
        return self._end.decide_live(fwd, layer_idx, self.step, self.tokens_fed)

    def observe_attention(self, layer_idx, query, key, attention_mask, scaling: float) -> None:
        """Called by the attention function right after SDPA, with what SDPA saw."""
        fwd = self._forward
        if fwd is None or layer_idx not in fwd.layer_rows:
            return
        start = self.stopwatch.now()
        layer, aside = self.layers[layer_idx], self.asides[layer_idx]
        aside.stash.scaling = scaling
        if fwd.probe:
            observe_question(fwd, layer, aside, layer_idx, query, scaling)
        elif fwd.compresses:
            rows = fwd.policy_rows(layer_idx, layer.held, self.tokens_fed, self.num_layers)
            observe_prefill(self.policy, layer, layer_idx, rows, fwd.observations.setdefault(layer_idx, {}),
                            query, key, attention_mask, scaling)
        elif keeps_decode_scores(self.policy, layer_idx):  # folded into the scores when due
            aside.stash.add(query[0], fwd.tags(fwd.layer_rows[layer_idx])[0])
        self.stopwatch.add("observe", start)
        if not fwd.explicit and layer_idx == self.num_layers - 1 and len(fwd.layer_rows) == self.num_layers:
            self.end_step()

    # --- reporting ---

    def stats(self) -> CacheStats:
        """A snapshot after the last completed step (its events only; all are in `events`)."""
        return self.stats_at(max(self.step - 1, 0))

    def stats_at(self, step: int) -> CacheStats:
        return snapshot(self.layers, self.asides, step, self.tokens_fed, self.image_sizes, self.log.events)

    def _new_forward(self, count: int, modality, image_id, overview, explicit: bool) -> ForwardTokens:
        default = Modality.TEXT if self.step == 0 else Modality.GENERATED
        fwd = new_forward(count, self.tokens_fed, modality, image_id, overview, explicit, default, self.step == 0)
        add_image_slots(self.image_sizes, fwd.image_id)
        self.tokens_fed += count
        return fwd

    def _settle(self) -> None:
        """End a forward that reached every layer but was not ended (transformers' generate)."""
        fwd = self._forward
        if fwd is not None and len(fwd.layer_rows) == self.num_layers:
            self.end_step()


def _num_layers(config) -> int:
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    return int(config.num_hidden_layers)
