"""StreamingLLM: attention sinks plus a window of recent tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from hae_cli.cache.policies.base import Policy, check_budget, check_int


@dataclass
class StreamingPolicy(Policy):
    """StreamingLLM, "Efficient Streaming Language Models with Attention Sinks",
    https://arxiv.org/abs/2309.17453.

    Keeps the first `sink` tokens (the attention sinks) and the most recent ones, `budget`
    in all; everything in between is evicted, at the end of prefill and while decoding. It
    needs no attention scores, so it also works with plain "sdpa".

        budget: tokens per layer; int = a count, float in (0, 1] = a fraction of the prompt.
        sink: attention-sink tokens kept at the start (the paper uses 4).
        buffer: tokens appended past the budget before a round trims back to it
            (0 = trim after every step, as in the paper).
    """

    name: ClassVar[str] = "streaming"

    budget: int | float = 0.5
    sink: int = 4
    buffer: int = 0

    def __post_init__(self) -> None:
        if self.budget is None:
            self.budget = 0.5
        check_budget(self.budget)
        check_int("sink", self.sink, 0)
        check_int("buffer", self.buffer, 0)

    def protected(self, budget: int) -> tuple[int, int]:
        sink = min(self.sink, budget)
        return sink, budget - sink

    def priority(self, layer) -> torch.Tensor:
        return torch.zeros(layer.held, device=layer.keys.device)
