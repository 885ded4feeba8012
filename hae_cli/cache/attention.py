"""The "hae_sdpa" attention function: SDPA's output, plus the attention rows a policy asked for.

`EvictingCache.update` marks itself active for the layer it just updated (a ContextVar);
the attention function that follows computes the normal SDPA output and then, if a cache
is active, lets it observe the query and keys. The cache asks its policy which rows it
needs and gets them from `summarize_attention`, which computes only those rows (a few
text queries at prefill, the one new query at decode), in chunks: never the `N x N`
matrix. With `config._attn_implementation = "sdpa"` nothing is observed.
"""

from __future__ import annotations

import weakref
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION_NAME = "hae_sdpa"

# (weak reference to the cache, layer index); weak so a cache left active can still be freed
_ACTIVE: ContextVar[tuple[weakref.ref, int] | None] = ContextVar("hae_active_cache", default=None)

_CHUNK_ELEMENTS = 1 << 22  # logits computed at once (16 MB of float32): bounds the extra memory


@dataclass(frozen=True)
class AttentionRequest:
    """Which softmax probabilities a policy wants: query rows of this forward x key columns.

    `rows` index the forward's query rows as the layer sees them; `cols` index the layer's held
    keys (this forward's row i is key `past + i`). None means all.
    """

    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None
    keep_lse: bool = False  # also return each row's log-sum-exp (for scoring the recycle bin later)


@dataclass
class AttentionSummary:
    """Probabilities over the requested columns, reduced over the requested rows, per query head."""

    sum: torch.Tensor  # [H_q, C] float32
    max: torch.Tensor  # [H_q, C] float32
    rows: int
    kv_heads: int
    lse: torch.Tensor | None = None  # [H_q, rows] float32, when asked for

    def sum_per_kv_head(self) -> torch.Tensor:
        """`[H_kv, C]`: the row sum, averaged over the query heads sharing a key head."""
        return kv_head_mean(self.sum, self.kv_heads)


def set_active(cache, layer_idx: int) -> None:
    _ACTIVE.set((weakref.ref(cache), layer_idx))


def clear_active() -> None:
    _ACTIVE.set(None)


def hae_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' SDPA attention, then the active cache observes what its policy needs."""
    output = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    active = _ACTIVE.get()
    if active is None:
        return output
    _ACTIVE.set(None)
    cache, layer_idx = active[0](), active[1]
    if cache is not None and getattr(module, "layer_idx", layer_idx) == layer_idx:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        cache.observe_attention(layer_idx, query, key, attention_mask, scale)
    return output


def summarize_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    request: AttentionRequest,
) -> AttentionSummary:
    """Softmax attention of `request.rows` over all allowed keys, kept at `request.cols`.

    query `[1, H_q, q, D]` (post-RoPE), key `[1, H_kv, N, D]`; grouped-query heads share a
    key head. The mask is the one SDPA got: None means causal with this forward's rows last.
    """
    q_len, n_keys = query.shape[2], key.shape[2]
    rows = request.rows if request.rows is not None else torch.arange(q_len, device=query.device)
    rows = rows.to(query.device)
    heads = query.shape[1]
    chunk = max(1, _CHUNK_ELEMENTS // max(1, heads * n_keys))
    total = maximum = None
    lse_parts = []
    for start in range(0, rows.numel(), chunk):
        chunk_rows = rows[start : start + chunk]
        logits = _masked_logits(query, key, attention_mask, scaling, chunk_rows)  # [H_q, r, N]
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        probs = torch.exp(logits - lse).nan_to_num_(0.0)  # a fully masked row attends nothing
        if request.cols is not None:
            probs = probs[..., request.cols.to(probs.device)]
        part_sum, part_max = probs.sum(dim=1), probs.amax(dim=1)
        total = part_sum if total is None else total + part_sum
        maximum = part_max if maximum is None else torch.maximum(maximum, part_max)
        if request.keep_lse:
            lse_parts.append(lse.squeeze(-1))
    if total is None:  # no rows requested
        n_cols = n_keys if request.cols is None else request.cols.numel()
        total = maximum = torch.zeros(heads, n_cols, device=query.device)
    lse = torch.cat(lse_parts, dim=1) if lse_parts else None
    return AttentionSummary(total, maximum, rows.numel(), key.shape[1], lse)


def _masked_logits(query, key, attention_mask, scaling, rows) -> torch.Tensor:
    heads, kv_heads = query.shape[1], key.shape[1]
    group = heads // kv_heads
    q = query[0, :, rows].float()  # [H_q, r, D]
    k = key[0].float()  # [H_kv, N, D]
    r, n_keys = q.shape[1], k.shape[1]
    logits = (q.reshape(kv_heads, group * r, -1) @ k.transpose(-1, -2)).reshape(heads, r, n_keys) * scaling
    if attention_mask is None:
        past = n_keys - query.shape[2]
        allowed = torch.arange(n_keys, device=k.device)[None, :] <= (past + rows)[:, None]
        return logits.masked_fill(~allowed, float("-inf"))
    mask = attention_mask[0][:, rows]  # [1 or H_q, r, N]
    if mask.dtype == torch.bool:
        return logits.masked_fill(~mask, float("-inf"))
    return logits + mask.float()


def kv_head_mean(per_query_head: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """`[H_q, ...]` -> `[H_kv, ...]`: the mean over the query heads sharing each key head."""
    heads = per_query_head.shape[0]
    return per_query_head.reshape(kv_heads, heads // kv_heads, *per_query_head.shape[1:]).mean(dim=1)


def what_if_attention(
    queries: torch.Tensor, lse: torch.Tensor, keys: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Attention the stored queries would have paid to keys that were not in the cache.

    queries `[H_q, t, D]` with their log-sum-exp `[H_q, t]` over the keys they did attend;
    keys `[1, H_kv, M, D]`. Returns `[H_kv, t, M]`: `exp(q.k * scale - lse)`, head-group mean.
    This is the bin's restore score: cheap (`t x M`) and on the same scale as the running score.
    """
    heads, steps = queries.shape[0], queries.shape[1]
    kv_heads, n_keys = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    k = keys[0].to(queries.device, torch.float32)
    logits = (queries.float().reshape(kv_heads, group * steps, -1) @ k.transpose(-1, -2)) * scaling
    probs = torch.exp(logits.reshape(heads, steps, n_keys) - lse.float()[..., None])
    return kv_head_mean(probs, kv_heads)


AttentionInterface.register(ATTENTION_NAME, hae_sdpa_attention)
# Masks are built exactly as for "sdpa" (so padding and multi-token feeds keep working).
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
