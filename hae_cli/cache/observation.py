"""What the cache observes of attention for its policy, and how running scores are kept.

At prefill the policy names the attention rows (or value vectors) it needs at a layer, and
they are summarised right after that layer's SDPA (`summarize_attention`: never the `N x N`
matrix). While decoding, a layer whose policy keeps running scores only stashes the new
query; the stash is folded into the scores of the active and the binned tokens when it is
due (`fold_scores`). Nothing is evicted between two folds, so this equals updating the
scores at every step.
"""

from __future__ import annotations

from hae_cli.cache.attention import ValueRequest, decayed_attention, summarize_attention, what_if_attention
from hae_cli.cache.rounds import needs_round


def observe_prefill(policy, layer, layer_idx: int, rows, observations: dict, query, key, attention_mask,
                    scaling: float) -> None:
    """Summarise what the policy asks of this layer's prefill into `observations` (by name), and
    start the running scores with the attention it names."""
    for name, request in policy.prefill_requests(layer_idx, rows).items():
        if isinstance(request, ValueRequest):
            summary = layer.values[0][:, rows.past + request.rows.to(layer.values.device)].float()
        else:
            summary = summarize_attention(query, key, attention_mask, scaling, request)
        observations[name] = summary
    request = policy.prefill_score_request(layer_idx, rows)
    if request is not None:
        summary = summarize_attention(query, key, attention_mask, scaling, request)
        layer.scores.add_(summary.sum_per_kv_head())


def fold_scores(layers, asides, policy, due_only: bool) -> None:
    """Fold each layer's stashed decode queries into its running scores: every layer
    (`due_only` False), or those that stashed `buffer` queries or need a round."""
    for layer, aside in zip(layers, asides):
        stashed = len(aside.stash)
        if not stashed:
            continue
        due = stashed >= max(1, policy.buffer) or needs_round(layer.held, layer.budget, policy.buffer)
        if due or not due_only:
            fold(layer, aside, policy.score_decay)


def fold(layer, aside, decay: float) -> None:
    """s <- decay^t * s + the decayed attention of the t stashed queries, for the held tokens and,
    with what they would have paid them, for the bin's."""
    queries, index = aside.stash.take()
    scaling, bin_ = aside.stash.scaling, aside.bin
    seen, lse = decayed_attention(queries, index, layer.keys, layer.token_index, scaling, decay)
    factor = decay ** index.numel()
    layer.scores.mul_(factor).add_(seen)
    if len(bin_):
        missed = what_if_attention(queries, lse, bin_.keys, scaling, decay)
        bin_.scores = factor * bin_.scores + missed.cpu()
