"""The "hae_sdpa" attention function: SDPA's output, plus the attention a policy needs.

`EvictingCache.update` marks itself active for the layer it just updated (a ContextVar);
the attention function that follows computes the normal SDPA output and then lets the
active cache observe the post-RoPE query and the keys. At prefill the cache asks its policy
which rows it wants and gets them from `summarize_attention`, which computes only those
rows (a few text queries, the last token), in chunks: never the `N x N` matrix. While
decoding the cache only stashes the new query; `decayed_attention` later folds the stashed
queries into the running scores in one batched product (nothing is evicted between two
folds, so this equals updating the scores at every step). With
`config._attn_implementation = "sdpa"` nothing is observed.
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
    need_max: bool = False  # also the maximum over rows (else only the sum)


@dataclass(frozen=True)
class ValueRequest:
    """The value vectors of `rows` of this forward at a layer (`[H_kv, r, D]` float32): content
    without RoPE, so tokens can be compared wherever they stand."""

    rows: torch.Tensor


@dataclass
class AttentionSummary:
    """Probabilities over the requested columns, reduced over the requested rows, per query head."""

    sum: torch.Tensor  # [H_q, C] float32
    max: torch.Tensor | None  # [H_q, C] float32, when asked for
    rows: int
    kv_heads: int

    def sum_per_kv_head(self) -> torch.Tensor:
        """`[H_kv, C]`: the row sum, averaged over the query heads sharing a key head."""
        return kv_head_mean(self.sum, self.kv_heads)


def set_active(cache, layer_idx: int) -> None:
    _ACTIVE.set((weakref.ref(cache), layer_idx))


def clear_active() -> None:
    _ACTIVE.set(None)


def hae_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' SDPA attention, then the active cache observes what its policy needs (in a
    compiled decode step, its `StaticStep` stashes the query)."""
    static_step = kwargs.pop("hae_step", None)
    output = sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )
    if static_step is not None:
        static_step.stash(module.layer_idx, query)
        return output
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
    cols = request.cols.to(query.device) if request.cols is not None else None
    heads = query.shape[1]
    chunk = max(1, _CHUNK_ELEMENTS // max(1, heads * n_keys))
    total = maximum = None
    for start in range(0, rows.numel(), chunk):
        chunk_rows = rows[start : start + chunk]
        logits = _masked_logits(query, key, attention_mask, scaling, chunk_rows)  # [H_q, r, N]
        probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)  # a fully masked row attends nothing
        if cols is not None:
            probs = probs[..., cols]
        total = probs.sum(dim=1) if total is None else total + probs.sum(dim=1)
        if request.need_max:
            part = probs.amax(dim=1)
            maximum = part if maximum is None else torch.maximum(maximum, part)
    if total is None:  # no rows requested
        total = torch.zeros(heads, n_keys if cols is None else cols.numel(), device=query.device)
        maximum = total if request.need_max else None
    return AttentionSummary(total, maximum, rows.numel(), key.shape[1])


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


def decayed_attention(
    queries: torch.Tensor,
    query_index: torch.Tensor,
    keys: torch.Tensor,
    key_index: torch.Tensor,
    scaling: float,
    decay: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention `t` past queries paid to the held keys, summed with decay.

    queries `[H_q, t, D]` (post-RoPE, oldest first) with their token indices `query_index` `[t]`;
    keys `[1, H_kv, N, D]` with theirs, `key_index` `[H_kv, N]`. Query k saw the keys fed up to
    itself. Returns (`sum_k decay^(t-1-k) a_k`, `[H_kv, N]`, head-group mean) and each
    query's log-sum-exp `[H_q, t]` (for scoring tokens it did not see, `what_if_attention`).
    """
    heads, steps = queries.shape[0], queries.shape[1]
    kv_heads, n_keys = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    query_index = query_index.to(key_index.device)
    logits = queries.float().reshape(kv_heads, group * steps, -1) @ keys[0].float().transpose(-1, -2)
    logits = logits.reshape(kv_heads, group, steps, n_keys).mul_(scaling)
    # Only keys fed after the oldest query can be hidden from one: mask from the first such column on.
    late = (key_index > query_index.min()).any(dim=0).nonzero()
    if late.numel():
        start = int(late[0])
        hidden = key_index[:, None, None, start:] > query_index[None, None, :, None]
        logits[..., start:].masked_fill_(hidden, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    probs = logits.sub_(lse).exp_()  # in place: the logits are not needed again
    if not bool(torch.isfinite(lse).all()):  # a query that saw no key (or an inf) attends nothing
        probs.nan_to_num_(0.0)
    probs = probs.mean(dim=1) if group > 1 else probs.squeeze(1)  # [H_kv, t, N]
    return probs.mul_(_decay_weights(steps, decay, probs.device)[None, :, None]).sum(dim=1), lse.reshape(heads, steps)


def what_if_attention(
    queries: torch.Tensor, lse: torch.Tensor, keys: torch.Tensor, scaling: float, decay: float
) -> torch.Tensor:
    """The decayed attention the queries would have paid keys that were not in the cache.

    queries `[H_q, t, D]` with their log-sum-exp `[H_q, t]` over the keys they did attend;
    keys `[1, H_kv, M, D]` (the recycle bin's). Returns `[H_kv, M]`: `sum_k decay^(t-1-k)
    exp(q_k . key * scale - lse_k)`, head-group mean: on the same scale as the running score.
    """
    heads, steps = queries.shape[0], queries.shape[1]
    kv_heads, n_keys = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    k = keys[0].to(queries.device, torch.float32)
    logits = (queries.float().reshape(kv_heads, group * steps, -1) @ k.transpose(-1, -2)) * scaling
    probs = torch.exp(logits.reshape(heads, steps, n_keys) - lse.float()[..., None])
    probs = kv_head_mean(probs, kv_heads)
    return (probs * _decay_weights(steps, decay, probs.device)[None, :, None]).sum(dim=1)


def kv_head_mean(per_query_head: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """`[H_q, ...]` -> `[H_kv, ...]`: the mean over the query heads sharing each key head."""
    heads = per_query_head.shape[0]
    return per_query_head.reshape(kv_heads, heads // kv_heads, *per_query_head.shape[1:]).mean(dim=1)


def _decay_weights(steps: int, decay: float, device) -> torch.Tensor:
    ages = torch.arange(steps - 1, -1, -1, device=device, dtype=torch.float32)
    return torch.pow(torch.tensor(float(decay), device=device), ages)


def register_attention() -> str:
    """Make "hae_sdpa" known to transformers (idempotent); returns its name, for a config's
    `_attn_implementation`. Masks are built exactly as for "sdpa" (so padding and multi-token
    feeds keep working)."""
    AttentionInterface.register(ATTENTION_NAME, hae_sdpa_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME
