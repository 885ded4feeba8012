"""What only some policies do: optional capabilities the cache asks a policy for.

The core of a policy (`Policy`) is what every policy has. A policy that also does one of these
derives from its class as well, and the cache asks with the functions below (an `isinstance`
check), so a policy without the capability is never asked:

`UsesRecycleBin`    a round moves what it evicts to a recycle bin, ranks bin tokens with the
                    held ones, brings the best back, and deletes bin tokens past their age or
                    over capacity (`bin_priority`, `bin_capacity`, `bin_ttl`).
`FollowsOneLayer`   one layer's round decides (in token indices) for every layer, and only that
                    layer keeps running scores while decoding (`representative_layer`).
`SwapsForQuestion`  a new turn's question is first fed as a probe; what it attends over the held
                    rows, the reserve and the bin decides a swap (`question_layer`, `turn_swap`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hae_cli.cache.policies.base import LayerView, Policy


class UsesRecycleBin:
    """Decode rounds with a recycle bin (HAE's Stage 2): evicted tokens wait in the bin, keep a
    running score of the attention they would have received, and come back when it beats the
    held ones."""

    bin_ttl: int  # a bin token not restored within this many rounds is deleted
    uses_bin: bool = True  # False: this configuration evicts for good (a bin of size 0)

    def bin_priority(self, view: LayerView) -> torch.Tensor:
        """`[M]`: what each bin token is worth, on the scale of `priority` (higher = restore first)."""
        return view.bin_scores.mean(dim=0)

    def bin_capacity(self, budget: int) -> int:
        """Tokens a layer's bin may hold after a round; the lowest `bin_priority` go first."""
        raise NotImplementedError


class FollowsOneLayer:
    """One decode decision for every layer (index broadcasting while decoding)."""

    def representative_layer(self) -> int | None:
        """The layer whose round every layer follows, by token (None: each layer decides)."""
        raise NotImplementedError


@dataclass(frozen=True)
class QuestionAttention:
    """What a new turn's question attended, at one layer: per key head (`[H_kv, n]`, summed over
    the question's rows, head-group mean) the held rows (before the question), and what it would
    have paid the reserve's and the bin's tokens; and per query head the most any of its rows paid
    each (`[H_q, n]`), for the dual-attention rule."""

    held: torch.Tensor
    reserve: torch.Tensor
    bin: torch.Tensor
    held_max: torch.Tensor | None = None
    reserve_max: torch.Tensor | None = None
    bin_max: torch.Tensor | None = None


@dataclass(frozen=True)
class TurnSwap:
    """Held rows `out` to the reserve (the bin, `to_bin`); reserve tokens `from_reserve` and bin
    tokens `from_bin` back."""

    out: torch.Tensor
    from_reserve: torch.Tensor
    from_bin: torch.Tensor
    to_bin: bool = False


class SwapsForQuestion:
    """A new turn's question, fed first as a probe, chooses what the layers hold for it."""

    def wants_question_probe(self) -> bool:
        """Whether this configuration probes a new turn's question at all."""
        return True

    def question_layer(self) -> int | None:
        """The layer whose question attention decides a turn's swap for every layer (by token);
        None: each layer decides its own."""
        return None

    def turn_swap(self, layer_idx: int, view: LayerView, question: QuestionAttention,
                  budget: int | None) -> TurnSwap | None:
        """Held rows out to the reserve, reserve and bin tokens back in (None: nothing moves)."""
        raise NotImplementedError


# --- how the cache asks ---


def recycle_bin(policy: Policy) -> UsesRecycleBin | None:
    """The policy as a bin user, or None where its rounds evict for good."""
    return policy if isinstance(policy, UsesRecycleBin) and policy.uses_bin else None


def representative_layer(policy: Policy) -> int | None:
    return policy.representative_layer() if isinstance(policy, FollowsOneLayer) else None


def keeps_decode_scores(policy: Policy, layer_idx: int) -> bool:
    """Whether a layer stashes decode queries for the running scores: a policy with scores, at
    every layer, or only at the representative one."""
    if policy.score_decay is None:
        return False
    representative = representative_layer(policy)
    return representative is None or layer_idx == representative


def probes_question(policy: Policy) -> bool:
    return isinstance(policy, SwapsForQuestion) and policy.wants_question_probe()
