"""Score, then keep the best: the shape most eviction methods share (kvpress's `ScorerPress`).

A `ScorerPolicy` says how much each token is worth; the selection is done here (at prefill)
or by the cache's rounds (while decoding): the protected rows stay, and of the others the
best-scored until the budget is full.
"""

from __future__ import annotations

import torch

from hae_cli.cache.policies.base import LayerView, Policy, PrefillKeep, Rows


class ScorerPolicy(Policy):
    """A policy defined by its scores. Decode rounds keep the `protected` rows and the best
    `score`d of the rest (per head when `per_head`); a policy that also compresses the prompt
    gives `prefill_score` over the prompt rows before its protected tail."""

    def score(self, view: LayerView) -> torch.Tensor:
        """What each held token is worth at a round: `[N]`, or `[H_kv, N]` per head. Default:
        its running score."""
        return view.scores if self.per_head else view.scores.mean(dim=0)

    def priority(self, view: LayerView) -> torch.Tensor:
        return self.score(view)

    # --- prefill ---

    def prefill_score(self, layer_idx: int, rows: Rows, attention: dict) -> torch.Tensor | None:
        """`[H_kv, q - prefill_recent]`: what each prompt row before the protected tail is worth
        (None: keep every row)."""
        return None

    def prefill_kept(self, rows: Rows) -> int:
        """Prompt rows a layer keeps."""
        return len(rows)

    def prefill_recent(self, rows: Rows) -> int:
        """The prompt's last rows, always kept (within `prefill_kept`)."""
        return 0

    def prefill_keep(self, layer_idx: int, rows: Rows, attention: dict) -> PrefillKeep | None:
        scores = self.prefill_score(layer_idx, rows, attention)
        if scores is None:
            return None
        keep = best_and_recent(scores, len(rows), self.prefill_kept(rows), self.prefill_recent(rows))
        return PrefillKeep(keep, layers=(layer_idx,))


def best_and_recent(scores: torch.Tensor, rows: int, kept: int, recent: int) -> torch.Tensor:
    """`[H, kept]` ascending rows per head: the last `min(recent, kept)` of the `rows`, and the
    best-scored of the others (`scores` `[H, rows - recent]`) up to `kept`."""
    chosen = scores.topk(max(0, kept - recent), dim=-1).indices.sort(dim=-1).values
    tail = torch.arange(rows - min(recent, kept), rows, device=chosen.device).expand(chosen.shape[0], -1)
    return torch.cat([chosen, tail], dim=-1)
