"""H2O: heavy hitters (accumulated attention) plus recent tokens, evicted greedily per head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from hae_cli.cache.attention import AttentionRequest
from hae_cli.cache.policies.base import Rows, check_budget, check_int, param
from hae_cli.cache.policies.scorer import ScorerPolicy


@dataclass
class H2OPolicy(ScorerPolicy):
    """H2O, "Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
    Models", https://arxiv.org/abs/2306.14048.

    Each key head keeps its own heavy hitters: the tokens with the largest attention
    accumulated over every query so far (prefill queries included), plus the most recent
    tokens. Eviction is greedy and final (no bin): once over budget, the lowest go.
    """

    name: ClassVar[str] = "h2o"
    per_head: ClassVar[bool] = True

    budget: int | float = param(0.5, "tokens per layer; int = a count, float in (0, 1] = a fraction of the prompt.")
    recent: int | None = param(None, "recent tokens always kept; None = half the budget (the paper's split).")
    buffer: int = param(0, "tokens appended past the budget before a round (0 = evict every step, as in the paper).")

    def __post_init__(self) -> None:
        if self.budget is None:
            self.budget = 0.5
        check_budget(self.budget)
        if self.recent is not None:
            check_int("recent", self.recent, 0)
        check_int("buffer", self.buffer, 0)

    score_decay: ClassVar[float] = 1.0  # accumulated attention, no decay

    def prefill_score_request(self, layer_idx: int, rows: Rows) -> AttentionRequest:
        return AttentionRequest()  # every prompt query's attention counts

    def protected(self, budget: int) -> tuple[int, int]:
        recent = budget // 2 if self.recent is None else self.recent
        return 0, min(recent, budget)
