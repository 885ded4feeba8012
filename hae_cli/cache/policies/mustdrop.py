"""MustDrop-style dual-attention filtering at prefill, greedy eviction while decoding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from hae_cli.cache.attention import AttentionRequest
from hae_cli.cache.policies.base import (
    Policy,
    PrefillKeep,
    Rows,
    check_budget,
    check_float,
    check_int,
    check_layer,
    param,
    resolve_budget,
)
from hae_cli.cache.policies.dual_attention import dual_attention_keep, dual_attention_request


@dataclass
class MustDropPolicy(Policy):
    """MustDrop, "Multi-Stage Vision Token Dropping: Towards Efficient Multimodal Large
    Language Model", https://arxiv.org/abs/2411.10803 (the baseline HAE builds on).

    Prefill: the same dual-attention filter as HAE's Stage 1 (global g_j and individual m_j
    scores at `score_layer`, index broadcasting). Decoding: the same running score, but
    eviction is greedy and final (no recycle bin) and visual and text tokens weigh the same.
    """

    name: ClassVar[str] = "mustdrop"

    score_layer: int = param(1, "the layer whose attention decides (0 = the first layer), as in hae.")
    r_g: float = param(0.9, "drop a visual token j only if g_j < r_g / N_visual (its share of the instruction's "
                            "attention, against the uniform share) ..., as in hae.")
    r_i: float = param(0.05, "... and m_j < r_i * max_j m_j (no head or query needs it badly), as in hae.")
    visual_keep: float | None = param(None, "budget mode instead of thresholds: keep this fraction of the visual "
                                            "tokens, top by g_j, plus every token with m_j >= r_i * max m, as in hae.")
    budget: int | float | None = param(None, "tokens per layer; int, float fraction of the prompt, None = the size "
                                             "after prefill pruning.")
    gamma: float = param(0.95, "running score decay, s <- gamma * s + a_t.")
    buffer: int = param(32, "tokens appended past the budget before a round brings the layer back to it.")
    sink: int = param(4, "the first `sink` tokens are never evicted.")
    recent: int = param(32, "the last `recent` tokens are never evicted.")

    def __post_init__(self) -> None:
        check_int("score_layer", self.score_layer, 0)
        check_float("r_g", self.r_g, 0.0)
        check_float("r_i", self.r_i, 0.0, 1.0)
        if self.visual_keep is not None:
            check_float("visual_keep", self.visual_keep, 0.0, 1.0, low_open=True)
        check_budget(self.budget)
        check_float("gamma", self.gamma, 0.0, 1.0)
        check_int("buffer", self.buffer, 0)
        check_int("sink", self.sink, 0)
        check_int("recent", self.recent, 0)

    def bind(self, num_layers: int) -> None:
        check_layer("score_layer", self.score_layer, 0, num_layers)

    def prefill_requests(self, layer_idx: int, rows: Rows) -> dict[str, AttentionRequest]:
        return dual_attention_request(layer_idx, self.score_layer, rows)

    def prefill_keep(self, layer_idx, rows, attention) -> PrefillKeep | None:
        return dual_attention_keep(layer_idx, rows, attention, self.r_g, self.r_i, self.visual_keep)

    @property
    def score_decay(self) -> float:
        return self.gamma

    def prefill_score_request(self, layer_idx: int, rows: Rows) -> AttentionRequest:
        return AttentionRequest(rows=torch.tensor([len(rows) - 1]))

    def resolve_budget(self, layer_idx: int, prompt_length: int, held: int) -> int | None:
        return held if self.budget is None else resolve_budget(self.budget, prompt_length)
