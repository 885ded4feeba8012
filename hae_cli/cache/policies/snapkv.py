"""SnapKV: the prompt's last queries vote, per head, for the prompt tokens worth keeping."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from hae_cli.cache.attention import AttentionRequest
from hae_cli.cache.policies.base import Policy, PrefillKeep, Rows, check_budget, check_int, resolve_budget
from hae_cli.errors import ConfigError


@dataclass
class SnapKVPolicy(Policy):
    """SnapKV, "SnapKV: LLM Knows What You are Looking for Before Generation",
    https://arxiv.org/abs/2404.14469.

    At prefill, in every layer, the attention of the last `window` prompt queries over the
    earlier prompt tokens is summed, smoothed by a 1-D max-pool, and each key head keeps its
    top tokens plus the window itself. Prefill only: decoding appends without evicting.

        budget: prompt tokens kept per layer; int = a count, float in (0, 1] = a fraction
            of the prompt.
        window: observation window, the last prompt queries that vote (paper: 32).
        kernel: max-pool kernel size, odd (paper: 7).
    """

    name: ClassVar[str] = "snapkv"
    per_head: ClassVar[bool] = True

    budget: int | float = 0.5
    window: int = 32
    kernel: int = 7

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
        if q <= self._kept(rows):
            return {}
        window = min(self.window, q)
        prefix = torch.arange(q - window, device=rows.positions.device)
        return {"window": AttentionRequest(rows=torch.arange(q - window, q), cols=rows.past + prefix)}

    def prefill_keep(self, layer_idx, rows, attention) -> PrefillKeep | None:
        summary = attention.get("window")
        if summary is None:
            return None
        q, kept = len(rows), self._kept(rows)
        window = min(self.window, q)
        votes = summary.sum_per_kv_head()  # [H_kv, q - window]
        votes = F.max_pool1d(votes[:, None], self.kernel, stride=1, padding=self.kernel // 2)[:, 0]
        chosen = votes.topk(max(0, kept - window), dim=-1).indices.sort(dim=-1).values
        tail = torch.arange(q - min(window, kept), q, device=chosen.device).expand(chosen.shape[0], -1)
        return PrefillKeep(torch.cat([chosen, tail], dim=-1), layers=(layer_idx,))

    def resolve_budget(self, layer_idx: int, prompt_length: int, held: int) -> None:
        return None  # no decode-time eviction

    def _kept(self, rows: Rows) -> int:
        return resolve_budget(self.budget, rows.prompt_length)

