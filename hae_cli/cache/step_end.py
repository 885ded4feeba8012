"""What the cache does when a forward ends, in order, with the parts that do it.

The prompt's forward (or a later one with images): the prefill decisions nobody asked for
between layers, a reserve decision for the layers that ran after it, each layer's budget.
Every step: the folds that are due, the rounds that are due, sliding windows, and after the
prompt the storage bound. A new turn's probe: its rows taken back, the question's swap.
"""

from __future__ import annotations

from hae_cli.cache.forward import ForwardTokens
from hae_cli.cache.observation import fold, fold_scores
from hae_cli.cache.prefill import PrefillCompaction
from hae_cli.cache.question import swap_for_question, take_back
from hae_cli.cache.reporting import EventLog, Stopwatch, count_modalities
from hae_cli.cache.rounds import Rounds, held_bound
from hae_cli.cache.window import trim_to_window, window_bound


class StepEnd:
    """Acts on the layers and their asides as the policy decides, timing each part."""

    def __init__(self, layers, asides, policy, log: EventLog, stopwatch: Stopwatch) -> None:
        self.layers, self.asides, self.policy, self.log, self.stopwatch = layers, asides, policy, log, stopwatch
        self.prefill = PrefillCompaction(layers, asides, policy, log)
        self.rounds = Rounds(layers, asides, policy, log)

    def decide_live(self, fwd: ForwardTokens, layer_idx: int, step: int, tokens_fed: int):
        """A prefill decision between layers (`after_layer`): the hidden rows to keep, or None."""
        start = self.stopwatch.now()
        self.prefill.step = step
        keep = self.prefill.decide(fwd, layer_idx, live=True, tokens_fed=tokens_fed)
        self.log.flush()
        self.stopwatch.add("prefill", start)
        return keep

    def prefill_done(self, fwd: ForwardTokens, step: int, tokens_fed: int) -> None:
        """The decisions of layers nobody asked between layers (transformers' own `generate`),
        a reserve decision for the layers after it, then each layer's decode budget."""
        start = self.stopwatch.now()
        self.prefill.step = step
        for layer_idx in range(len(self.layers)):
            if layer_idx not in fwd.decided:
                self.prefill.decide(fwd, layer_idx, live=False, tokens_fed=tokens_fed)
        self.prefill.finish(fwd, step)
        for layer_idx, layer in enumerate(self.layers):
            layer.budget = self.policy.resolve_budget(layer_idx, tokens_fed, layer.held)
        self.stopwatch.add("prefill", start)

    def step_done(self, step: int, tokens_fed: int, prefill: bool) -> None:
        """Fold the scores that are due, run the rounds that are due, trim sliding layers; after
        the prompt, size each layer's storage to its bound."""
        clock = self.stopwatch
        start = clock.now()
        fold_scores(self.layers, self.asides, self.policy, due_only=True)
        start = clock.add("scores", start)
        stage = "prefill" if prefill else "decode"
        self.rounds.run(step, stage)
        for layer_idx, (layer, aside) in enumerate(zip(self.layers, self.asides)):
            dropped = trim_to_window(layer, aside, tokens_fed)  # what no later token can see
            if dropped is not None:
                self.log.record_counts(step, layer_idx, stage, "evicted", count_modalities(dropped))
        if prefill:  # the prompt-size storage goes; from now on each layer holds at most its bound
            for layer in self.layers:
                layer.limit_rows(window_bound(held_bound(layer.budget, self.policy.buffer), layer.window))
        clock.add("rounds", start)
        self.log.flush()

    def fold_full_rings(self) -> None:
        """After a compiled step: a full query ring is folded now (the next step has no slot)."""
        for layer, aside in zip(self.layers, self.asides):
            ring = aside.stash.ring
            if ring is not None and ring.filled >= ring.size:
                fold(layer, aside, self.policy.score_decay)

    def probe_done(self, fwd: ForwardTokens, step: int) -> None:
        """Take a probe's rows back out of every layer, then apply the question's swap."""
        start = self.stopwatch.now()
        take_back(fwd, self.layers)
        swap_for_question(fwd, self.layers, self.asides, self.policy, self.log, step)
        self.log.flush()
        self.stopwatch.add("rounds", start)
