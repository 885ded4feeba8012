"""StreamingLLM: attention sinks plus a window of recent tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from hae_cli.cache.policies.base import LayerView, check_budget, check_int, param
from hae_cli.cache.policies.scorer import ScorerPolicy


@dataclass
class StreamingPolicy(ScorerPolicy):
    """StreamingLLM, "Efficient Streaming Language Models with Attention Sinks",
    https://arxiv.org/abs/2309.17453.

    Keeps the first `sink` tokens (the attention sinks) and the most recent ones, `budget`
    in all; everything in between is evicted, at the end of prefill and while decoding. It
    needs no attention scores, so it also works with plain "sdpa".
    """

    name: ClassVar[str] = "streaming"

    budget: int | float = param(0.5, "tokens per layer; int = a count, float in (0, 1] = a fraction of the prompt.")
    sink: int = param(4, "attention-sink tokens kept at the start (the paper uses 4).")
    buffer: int = param(0, "tokens appended past the budget before a round trims back to it (0 = trim after every "
                           "step, as in the paper).")

    def __post_init__(self) -> None:
        if self.budget is None:
            self.budget = 0.5
        check_budget(self.budget)
        check_int("sink", self.sink, 0)
        check_int("buffer", self.buffer, 0)

    def protected(self, budget: int) -> tuple[int, int]:
        sink = min(self.sink, budget)
        return sink, budget - sink

    def score(self, view: LayerView) -> torch.Tensor:
        return torch.zeros(view.held, device=view.scores.device)  # every unprotected token alike
