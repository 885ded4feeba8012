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
    resolve_budget,
)
from hae_cli.cache.policies.hae import dual_attention_keep, dual_attention_request


@dataclass
class MustDropPolicy(Policy):
    """MustDrop, "Multi-Stage Vision Token Dropping: Towards Efficient Multimodal Large
    Language Model", https://arxiv.org/abs/2411.10803 (the baseline HAE builds on).

    Prefill: the same dual-attention filter as HAE's Stage 1 (global g_j and individual m_j
    scores at `score_layer`, index broadcasting). Decoding: the same running score, but
    eviction is greedy and final (no recycle bin) and visual and text tokens weigh the same.

        score_layer, r_g, r_i, visual_keep: as in `hae` (Stage 1).
        budget: tokens per layer; int, float fraction of the prompt, None = the size after
            prefill pruning.
        gamma: running score decay, s <- gamma * s + a_t.
        buffer: tokens appended past the budget before a round brings the layer back to it.
        sink, recent: first / last tokens never evicted.
    """

    name: ClassVar[str] = "mustdrop"

    score_layer: int = 1
    r_g: float = 0.9
    r_i: float = 0.05
    visual_keep: float | None = None
    budget: int | float | None = None
    gamma: float = 0.95
    buffer: int = 32
    sink: int = 4
    recent: int = 32

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
