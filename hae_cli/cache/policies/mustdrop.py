"""MustDrop-style dual-attention filtering at prefill, greedy eviction while decoding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from hae_cli.cache.attention import AttentionRequest
from hae_cli.cache.policies.base import Rows, check_budget, check_float, check_int, param, resolve_budget
from hae_cli.cache.policies.dual_attention import DualAttentionPruning, dual_attention_param


@dataclass
class MustDropPolicy(DualAttentionPruning):
    """MustDrop, "Multi-Stage Vision Token Dropping: Towards Efficient Multimodal Large
    Language Model", https://arxiv.org/abs/2411.10803 (the baseline HAE builds on).

    Prefill: the same dual-attention filter as HAE's Stage 1 (global g_j and individual m_j
    scores at `score_layer`, index broadcasting). Decoding: the same running score, but
    eviction is greedy and final (no recycle bin) and visual and text tokens weigh the same.
    """

    name: ClassVar[str] = "mustdrop"

    score_layer: int = dual_attention_param("score_layer", 1, as_in_hae=True)
    r_g: float = dual_attention_param("r_g", 0.9, as_in_hae=True)
    r_i: float = dual_attention_param("r_i", 0.05, as_in_hae=True)
    visual_keep: float | None = dual_attention_param("visual_keep", None, as_in_hae=True)
    budget: int | float | None = param(None, "tokens per layer; int, float fraction of the prompt, None = the size "
                                             "after prefill pruning.")
    gamma: float = param(0.95, "running score decay, s <- gamma * s + a_t.")
    buffer: int = param(32, "tokens appended past the budget before a round brings the layer back to it.")
    sink: int = param(4, "the first `sink` tokens are never evicted.")
    recent: int = param(32, "the last `recent` tokens are never evicted.")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_budget(self.budget)
        check_float("gamma", self.gamma, 0.0, 1.0)
        check_int("buffer", self.buffer, 0)
        check_int("sink", self.sink, 0)
        check_int("recent", self.recent, 0)

    @property
    def score_decay(self) -> float:
        return self.gamma

    def prefill_score_request(self, layer_idx: int, rows: Rows) -> AttentionRequest:
        return AttentionRequest(rows=torch.tensor([len(rows) - 1]))

    def resolve_budget(self, layer_idx: int, prompt_length: int, held: int) -> int | None:
        return held if self.budget is None else resolve_budget(self.budget, prompt_length)
