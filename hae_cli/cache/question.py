"""A new turn's question, fed once as a probe: what it attends decides what comes back.

In a conversation the images are compressed before any question is known. When a turn's
question is fed, the cache can first take it as a probe (`begin_tokens(..., probe=True)`): at
every layer the question's rows attend over what the layer holds, and what they would have
paid the tokens set aside in the reserve and the bin is computed from the same log-sum-exp
(`what_if_attention`). Then the probe's rows are taken back out, the policy swaps tokens
between the held rows and the reserve and bin (`turn_swap`, within the held count: the budget
holds), and the question is fed for real, attending to what it asked for.
"""

from __future__ import annotations

import torch

from hae_cli.cache.attention import kv_head_mean
from hae_cli.cache.forward import ForwardTokens
from hae_cli.cache.modality import Modality
from hae_cli.cache.policies import LayerView, QuestionAttention, TurnSwap
from hae_cli.cache.reporting import EventLog
from hae_cli.cache.reserve import swap_with_reserve


def observe_question(fwd: ForwardTokens, layer, aside, layer_idx: int, query: torch.Tensor, scaling: float) -> None:
    """The question rows' attention (the probe's text rows) over the layer's held rows before the
    probe, and what it would have paid the reserve's and the bin's tokens (`what_if_attention`'s
    rule: the same log-sum-exp), summed over the rows and as each query head's maximum."""
    rows = fwd.layer_rows.get(layer_idx)
    tags = fwd.modality if rows is None else fwd.modality[rows]
    text = (tags == Modality.TEXT).nonzero().squeeze(-1)
    if not text.numel():
        return
    q = query[0][:, text.to(query.device)].float()  # [H_q, r, D]
    index = (fwd.index if rows is None else fwd.index[rows])[text.to(fwd.index.device)].to(layer.keys.device)
    heads, kv_heads = q.shape[0], layer.keys.shape[1]
    group = heads // kv_heads

    def logits(keys: torch.Tensor) -> torch.Tensor:  # [H_q, r, n]
        k = keys[0].to(q.device, torch.float32).repeat_interleave(group, dim=0)
        return (q @ k.transpose(-1, -2)) * scaling

    held = logits(layer.keys)
    later = layer.token_index[0].to(index.device)[None, :] > index[:, None]  # keys fed after a question row
    held = held.masked_fill(later[None], float("-inf"))
    lse = torch.logsumexp(held, dim=-1, keepdim=True)
    past = layer.held - (fwd.count if rows is None else rows.numel())

    def summed(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return kv_head_mean(probs.sum(dim=1), kv_heads).cpu(), probs.amax(dim=1).cpu() if probs.shape[1] else probs[:, 0]

    def missed(store) -> tuple[torch.Tensor, torch.Tensor]:
        if not len(store):
            empty = torch.zeros(kv_heads, 0)
            return empty, torch.zeros(heads, 0)
        return summed((logits(store.keys) - lse).exp())

    held_sum, held_max = summed((held[..., :past] - lse).exp())
    reserve_sum, reserve_max = missed(aside.reserve)
    bin_sum, bin_max = missed(aside.bin)
    fwd.questions[layer_idx] = QuestionAttention(held_sum, reserve_sum, bin_sum, held_max, reserve_max, bin_max)


def take_back(fwd: ForwardTokens, layers) -> None:
    """Remove the probe's rows from every layer (they are the last rows each layer holds)."""
    for layer_idx, layer in enumerate(layers):
        rows = fwd.layer_rows.get(layer_idx)
        count = fwd.count if rows is None else rows.numel()
        if count:
            layer.compact(torch.arange(layer.held - count, device=layer.keys.device))


def swap_for_question(fwd: ForwardTokens, layers, asides, policy, log: EventLog, step: int) -> None:
    """The policy's `turn_swap` (a `SwapsForQuestion` policy), applied: held rows out to the
    reserve, reserve and bin tokens back; decided at `question_layer` for every layer by token,
    or at each layer for itself."""
    decider = policy.question_layer()
    if decider is not None:
        question = fwd.questions.get(decider)
        if question is None:
            return
        layer, aside = layers[decider], asides[decider]
        swap = policy.turn_swap(decider, LayerView.of(layer, aside), question, layer.budget)
        if swap is None:
            return
        out = layer.token_index[0][swap.out.to(layer.keys.device)].cpu()
        back = torch.cat([aside.reserve.token_index[swap.from_reserve], aside.bin.token_index[swap.from_bin]])
        for layer_idx, (target, beside) in enumerate(zip(layers, asides)):
            mine = TurnSwap(
                torch.isin(target.token_index[0].cpu(), out).nonzero().squeeze(-1),
                torch.isin(beside.reserve.token_index, back).nonzero().squeeze(-1),
                torch.isin(beside.bin.token_index, back).nonzero().squeeze(-1),
                swap.to_bin,
            )
            _apply(target, beside, layer_idx, mine, log, step)
        return
    for layer_idx, (layer, aside) in enumerate(zip(layers, asides)):
        question = fwd.questions.get(layer_idx)
        if question is None:
            continue
        swap = policy.turn_swap(layer_idx, LayerView.of(layer, aside), question, layer.budget)
        if swap is not None:
            _apply(layer, aside, layer_idx, swap, log, step)


def _apply(layer, aside, layer_idx: int, swap, log: EventLog, step: int) -> None:
    if not (swap.out.numel() or swap.from_reserve.numel() or swap.from_bin.numel()):
        return
    moved, back = swap_with_reserve(layer, aside, swap.out, swap.from_reserve, swap.from_bin, swap.to_bin)
    if len(moved):
        log.record(step, layer_idx, "turn", "binned" if swap.to_bin else "reserved", moved.modality)
    if len(back):
        log.record(step, layer_idx, "turn", "restored", back.modality)
