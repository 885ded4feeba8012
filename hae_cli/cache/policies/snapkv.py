"""SnapKV: the prompt's last queries vote, per head, for the prompt tokens worth keeping."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from hae_cli.cache.attention import AttentionRequest
from hae_cli.cache.policies.base import Rows, check_budget, check_int, param, resolve_budget
from hae_cli.cache.policies.scorer import ScorerPolicy
from hae_cli.errors import ConfigError


@dataclass
class SnapKVPolicy(ScorerPolicy):
    """SnapKV, "SnapKV: LLM Knows What You are Looking for Before Generation",
    https://arxiv.org/abs/2404.14469.

    At prefill, in every layer, the attention of the last `window` prompt queries over the
    earlier prompt tokens is summed, smoothed by a 1-D max-pool, and each key head keeps its
    top tokens plus the window itself. Prefill only: decoding appends without evicting.
    """

    name: ClassVar[str] = "snapkv"
    per_head: ClassVar[bool] = True

    budget: int | float = param(0.5, "prompt tokens kept per layer; int = a count, float in (0, 1] = a fraction "
                                     "of the prompt.")
    window: int = param(32, "observation window, the last prompt queries that vote (paper: 32).")
    kernel: int = param(7, "max-pool kernel size, odd (paper: 7).")

    def __post_init__(self) -> None:
        if self.budget is None:
            self.budget = 0.5
        check_budget(self.budget)
        check_int("window", self.window, 1)
        check_int("kernel", self.kernel, 1)
        if self.kernel % 2 == 0:
            raise ConfigError(f"kernel must be an odd integer >= 1, got {self.kernel}")

    def prefill_requests(self, layer_idx: int, rows: Rows) -> dict[str, AttentionRequest]:
        q = len(rows)
        if q <= self.prefill_kept(rows) or q <= self.window:  # all kept: the window is the whole prompt
            return {}
        window = min(self.window, q)
        prefix = torch.arange(q - window, device=rows.index.device)
        return {"window": AttentionRequest(rows=torch.arange(q - window, q), cols=rows.past + prefix)}

    def prefill_score(self, layer_idx, rows, attention) -> torch.Tensor | None:
        summary = attention.get("window")
        if summary is None:
            return None
        votes = summary.sum_per_kv_head()  # [H_kv, q - window]
        return F.max_pool1d(votes[:, None], self.kernel, stride=1, padding=self.kernel // 2)[:, 0]

    def prefill_kept(self, rows: Rows) -> int:
        return resolve_budget(self.budget, rows.prompt_length)

    def prefill_recent(self, rows: Rows) -> int:
        return min(self.window, len(rows))

    def resolve_budget(self, layer_idx: int, prompt_length: int, held: int) -> None:
        return None  # no decode-time eviction
