"""Dual-attention pruning of visual tokens at prefill (MustDrop's filter, arXiv 2411.10803),
shared by `hae` (its Stage 1) and `mustdrop`.

At the scoring layer the instruction's text queries (the text after the last visual token)
attend over the visual tokens. Per visual token j: a global score g_j (mean over heads of the
sum over queries, normalised to sum 1) and an individual score m_j (max over heads and
queries). A token is dropped only if the instruction as a whole pays it little (g_j under
r_g times the uniform share) and no head or query needs it badly (m_j under r_i times the
largest). The kept set is broadcast: later layers never compute the dropped tokens.
"""

from __future__ import annotations

import math

import torch

from hae_cli.cache.attention import AttentionRequest, AttentionSummary
from hae_cli.cache.layer import complement
from hae_cli.cache.modality import Modality
from hae_cli.cache.policies.base import PrefillKeep, Rows


def dual_attention_request(layer_idx: int, score_layer: int, rows: Rows) -> dict[str, AttentionRequest]:
    """At the scoring layer: the instruction's text queries over the visual tokens."""
    if layer_idx != score_layer:
        return {}
    split = instruction_and_visual(rows)
    if split is None:
        return {}
    queries, visual = split
    return {"dual_attention": AttentionRequest(rows=queries, cols=rows.past + visual, need_max=True)}


def dual_attention_keep(layer_idx, rows, attention, r_g, r_i, visual_keep) -> PrefillKeep | None:
    summary: AttentionSummary | None = attention.get("dual_attention")
    if summary is None:
        return None
    _, visual = instruction_and_visual(rows)
    return keep_all_but(visual[dual_attention_drop(summary.sum, summary.max, r_g, r_i, visual_keep)], layer_idx, rows)


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
