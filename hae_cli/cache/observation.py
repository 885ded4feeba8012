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


def fold_scores(layers, policy, due_only: bool) -> None:
    """Fold each layer's stashed decode queries into its running scores: every layer
    (`due_only` False), or those that stashed `buffer` queries or need a round."""
    for layer in layers:
        if not layer.stashed:
            continue
        due = layer.stashed >= max(1, policy.buffer) or policy.needs_round(layer.held, layer.budget)
        if due or not due_only:
            fold(layer, policy.score_decay)


def fold(layer, decay: float) -> None:
    """s <- decay^t * s + the decayed attention of the t stashed queries, for the held tokens and,
    with what they would have paid them, for the bin's."""
    queries, index = layer.take_stash()
    seen, lse = decayed_attention(queries, index, layer.keys, layer.token_index, layer.attention_scaling, decay)
    factor = decay ** index.numel()
    layer.scores.mul_(factor).add_(seen)
    if len(layer.bin):
        missed = what_if_attention(queries, lse, layer.bin.keys, layer.attention_scaling, decay)
        layer.bin.scores = factor * layer.bin.scores + missed.cpu()
