"""Dual-attention pruning of visual tokens at prefill (MustDrop's filter, arXiv 2411.10803),
shared by `hae` (its Stage 1) and `mustdrop`: its parameters, their checks and the rule, once.

At the scoring layer the instruction's text queries (the text after the last visual token)
attend over the visual tokens. Per visual token j: a global score g_j (mean over heads of the
sum over queries, normalised to sum 1) and an individual score m_j (max over heads and
queries). A token is dropped only if the instruction as a whole pays it little (g_j under
r_g times the uniform share) and no head or query needs it badly (m_j under r_i times the
largest). The kept set is broadcast: later layers never compute the dropped tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hae_cli.cache.attention import AttentionRequest, AttentionSummary
from hae_cli.cache.indices import complement
from hae_cli.cache.modality import Modality
from hae_cli.cache.policies.base import Policy, PrefillKeep, Rows, check_float, check_int, check_layer, param

# each parameter's meaning, and how `hae` ends it (another policy says "as in hae")
_MEANINGS = {
    "score_layer": ("the layer whose attention decides (0 = the first layer)", "."),
    "r_g": ("drop a visual token j only if g_j < r_g / N_visual (its share of the instruction's attention, against "
            "the uniform share) ...", ""),
    "r_i": ("... and m_j < r_i * max_j m_j (no head or query needs it badly)", "."),
    "visual_keep": ("budget mode instead of thresholds: keep this fraction of the visual tokens, top by g_j, plus "
                    "every token with m_j >= r_i * max m", "."),
}


def dual_attention_param(name: str, default, as_in_hae: bool = False):
    """One of the rule's parameters, with its default for a policy (`as_in_hae`: its help says so)."""
    meaning, end = _MEANINGS[name]
    return param(default, meaning + (", as in hae." if as_in_hae else end))


@dataclass
class DualAttentionPruning(Policy):
    """A policy whose prefill is the dual-attention rule: `score_layer`, `r_g`, `r_i`,
    `visual_keep` (HAE's defaults; a subclass redeclares a field to change its default)."""

    score_layer: int = dual_attention_param("score_layer", 1)
    r_g: float = dual_attention_param("r_g", 1.5)
    r_i: float = dual_attention_param("r_i", 0.5)
    visual_keep: float | None = dual_attention_param("visual_keep", None)

    def __post_init__(self) -> None:
        check_int("score_layer", self.score_layer, 0)
        check_float("r_g", self.r_g, 0.0)
        check_float("r_i", self.r_i, 0.0, 1.0)
        if self.visual_keep is not None:
            check_float("visual_keep", self.visual_keep, 0.0, 1.0, low_open=True)

    def bind(self, num_layers: int) -> None:
        check_layer("score_layer", self.score_layer, 0, num_layers)

    def prefill_requests(self, layer_idx: int, rows: Rows) -> dict[str, AttentionRequest]:
        return dual_attention_request(layer_idx, self.score_layer, rows)

    def prefill_keep(self, layer_idx, rows, attention) -> PrefillKeep | None:
        dropped = self.dropped_visual(rows, attention)
        return None if dropped is None else keep_all_but(dropped[0][dropped[1]], layer_idx, rows)

    def dropped_visual(self, rows: Rows, attention: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(the visual rows, which of them the rule drops: `[N_vis]` bool), or None where the
        scoring layer observed nothing."""
        summary: AttentionSummary | None = attention.get("dual_attention")
        if summary is None:
            return None
        _, visual = instruction_and_visual(rows)
        return visual, dual_attention_drop(summary.sum, summary.max, self.r_g, self.r_i, self.visual_keep)


def dual_attention_request(layer_idx: int, score_layer: int, rows: Rows) -> dict[str, AttentionRequest]:
    """At the scoring layer: the instruction's text queries over the visual tokens."""
    if layer_idx != score_layer:
        return {}
    split = instruction_and_visual(rows)
    if split is None:
        return {}
    queries, visual = split
    return {"dual_attention": AttentionRequest(rows=queries, cols=rows.past + visual, need_max=True)}


def keep_all_but(dropped: torch.Tensor, layer_idx: int, rows: Rows) -> PrefillKeep | None:
    """Every row but `dropped`, for this layer and those before it, and broadcast to the rest."""
    if dropped.numel() == 0:
        return None
    keep = complement(dropped.to(rows.index.device), len(rows))
    return PrefillKeep(keep, layers=tuple(range(layer_idx + 1)), broadcast=True)


def dual_attention_drop(attention_sum, attention_max, r_g, r_i, visual_keep) -> torch.Tensor:
    """Which visual tokens to drop (`[N_vis]` bool) from `[H, N_vis]` row sums and row maxima."""
    n_visual = attention_sum.shape[-1]
    g = attention_sum.mean(dim=0)
    g = g / g.sum().clamp_min(torch.finfo(g.dtype).tiny)
    m = attention_max.amax(dim=0)
    needed = m >= r_i * m.max()
    if visual_keep is None:
        return ~(needed | (g >= r_g / n_visual))
    keep = needed.clone()
    keep[g.topk(math.ceil(visual_keep * n_visual)).indices] = True
    return ~keep


def instruction_and_visual(rows: Rows) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(text rows after the last visual token, visual token rows), or None without images.

    With no text after the images, the last row is the query.
    """
    image = rows.modality == Modality.IMAGE
    visual = image.nonzero().squeeze(-1)
    if visual.numel() == 0:
        return None
    after = torch.arange(len(rows), device=image.device) > visual[-1]
    queries = ((rows.modality == Modality.TEXT) & after).nonzero().squeeze(-1)
    if queries.numel() == 0:
        queries = torch.tensor([len(rows) - 1], device=image.device)
    return queries, visual
