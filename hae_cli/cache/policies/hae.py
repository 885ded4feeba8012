"""HAE: Hierarchical Adaptive Eviction (the method this tool is built around)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from hae_cli.cache.attention import AttentionRequest, ValueRequest
from hae_cli.cache.modality import Modality
from hae_cli.cache.policies.base import (
    LayerView,
    PrefillKeep,
    Rows,
    check_budget,
    check_float,
    check_int,
    param,
    resolve_budget,
    visual_rows,
)
from hae_cli.cache.policies.capabilities import (
    FollowsOneLayer,
    QuestionAttention,
    SwapsForQuestion,
    TurnSwap,
    UsesRecycleBin,
)
from hae_cli.cache.policies.dual_attention import DualAttentionPruning, instruction_and_visual, keep_all_but
from hae_cli.errors import ConfigError


FLOOR_SCORES = ("distinct", "attention")
SEPARATORS = ("keep", "with_row")
FLOOR_FROM = ("overview", "image")
RESERVE = ("auto", "on", "off")


@dataclass
class HAEPolicy(DualAttentionPruning, UsesRecycleBin, FollowsOneLayer, SwapsForQuestion):
    """Hierarchical Adaptive Eviction, "Hierarchical Adaptive Eviction for KV Cache Management
    in Multimodal Language Models", https://arxiv.org/abs/2602.02197 (the rules as built, with
    their sources and what was measured: docs/HAE.md).

    Visual tokens go first, at prefill, where they are sparse; then text and visual tokens
    are evicted jointly while decoding, softly, through a recycle bin.

    Stage 1, Dual-Attention Pruning (once, at prefill; MustDrop's filter, `dual_attention.py`):
    the instruction's text queries score the visual tokens at `score_layer` (global g_j and
    individual m_j); the kept set is applied to every layer at and after `score_layer` and to
    the hidden states (later layers never compute dropped tokens), and to the layers before it
    as soon as it is known. Each image also keeps a floor of its tokens: the hierarchical step
    (per image, then per view, then per token), so no image is starved by an instruction such
    as "Describe each image in order.", which does not say what each caption will need;
    "distinct" picks what stands out from the image's background, whatever the instruction.
    Text, special tokens and image separators are never dropped at prefill; kept tokens keep
    their original positions.

    Stage 2, Dynamic Decoding Eviction with a recycle bin: every token keeps a running score of
    the attention it receives; a layer that holds B + d tokens is brought back to B, the
    lowest-ranked unprotected tokens going to the bin (or, over its capacity or age, deleted),
    and a bin token whose score beats the weakest active one comes back with its original
    position. A bin token's score goes on with the attention the recent queries would have
    paid it.
    """

    name: ClassVar[str] = "hae"

    # score_layer, r_g, r_i, visual_keep: Stage 1's rule (`DualAttentionPruning`)
    image_floor: float = param(0.15, "each image also keeps this fraction of its visual tokens, the best of its "
                                     "overview by `floor_score` (0 = off).")
    floor_from: str = param("overview", "\"overview\" (the image's global view, when the model has one) or "
                                        "\"image\" (all its tokens, every view).")
    floor_score: str = param("distinct", "\"distinct\" (a token's value vectors at `score_layer` far from its "
                                         "image's mean) or \"attention\" (g_j): how the floor ranks an image's tokens.")
    separators: str = param("keep", "\"keep\": every image separator stays; \"with_row\": a row's separator "
                                    "goes with its row when Stage 1 drops all of the row's tokens.")
    budget: int | float | None = param(None, "tokens per layer B; int = a count, float in (0, 1] = a fraction of "
                                             "the prompt, None = the size after prefill pruning.")
    gamma: float = param(0.95, "running score decay, s <- gamma * s + a_t (a_t: attention received at step t, "
                               "averaged over heads).")
    buffer: int = param(32, "d; tokens append freely until a layer holds B + d, then one round brings it back "
                            "to B. The last d queries also score the bin.")
    sink: int = param(4, "the first `sink` tokens are never evicted.")
    recent: int = param(32, "the last `recent` tokens are never evicted.")
    w_visual: float = param(0.5, "a round ranks unprotected tokens by w * s: the weight of image tokens and "
                                 "separators.")
    w_text: float = param(1.0, "... and of text and generated tokens.")
    bin_size: int | None = param(None, "bin capacity per layer; None = B // 4, 0 = no bin (evictions are final). "
                                       "Over capacity, the lowest-scored bin tokens are deleted first.")
    bin_ttl: int = param(4, "a bin token not restored within this many rounds is deleted.")
    broadcast: bool = param(False, "one decode decision at `score_layer`, applied to every layer (faster; only "
                                   "that layer computes decode scores) instead of one decision per layer.")
    reserve: str = param("auto", "Stage 1's dropped tokens: \"on\" kept off the attention path for a later "
                                 "question; \"off\" deleted (later layers skip them); \"auto\" on for a "
                                 "conversation's images.")
    turn_restore: bool = param(True, "each new question reruns Stage 1 over the image tokens held and set "
                                     "aside; what it needs swaps in (the attended size stays).")
    turn_floor: bool = param(True, "with turn_restore, each image's floor from the prefill stays held; "
                                   "only the rest is chosen by the question.")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("image_floor", self.image_floor, 0.0, 1.0)
        if self.floor_from not in FLOOR_FROM:
            raise ConfigError(f"floor_from must be one of {', '.join(FLOOR_FROM)}, got {self.floor_from!r}")
        if self.floor_score not in FLOOR_SCORES:
            raise ConfigError(f"floor_score must be one of {', '.join(FLOOR_SCORES)}, got {self.floor_score!r}")
        if self.separators not in SEPARATORS:
            raise ConfigError(f"separators must be one of {', '.join(SEPARATORS)}, got {self.separators!r}")
        check_budget(self.budget)
        check_float("gamma", self.gamma, 0.0, 1.0)
        check_int("buffer", self.buffer, 0)
        check_int("sink", self.sink, 0)
        check_int("recent", self.recent, 0)
        check_float("w_visual", self.w_visual, 0.0)
        check_float("w_text", self.w_text, 0.0)
        if self.bin_size is not None:
            check_int("bin_size", self.bin_size, 0)
        check_int("bin_ttl", self.bin_ttl, 1)
        if not isinstance(self.broadcast, bool):
            raise ConfigError(f"broadcast must be true or false, got {self.broadcast!r}")
        if isinstance(self.reserve, bool):  # `-p reserve=on` / `off` read as booleans
            self.reserve = "on" if self.reserve else "off"
        if self.reserve not in RESERVE:
            raise ConfigError(f"reserve must be one of {', '.join(RESERVE)}, got {self.reserve!r}")
        if not isinstance(self.turn_restore, bool):
            raise ConfigError(f"turn_restore must be true or false, got {self.turn_restore!r}")

    @property
    def uses_bin(self) -> bool:
        return self.bin_size != 0

    # --- Stage 1: Dual-Attention Pruning ---

    def prefill_requests(self, layer_idx: int, rows: Rows) -> dict:
        requests = super().prefill_requests(layer_idx, rows)
        if requests and self.image_floor > 0 and self.floor_score == "distinct":
            requests["values"] = ValueRequest(rows=instruction_and_visual(rows)[1])
        return requests

    def prefill_keep(self, layer_idx, rows, attention) -> PrefillKeep | None:
        dropped = self.dropped_visual(rows, attention)
        if dropped is None:
            return None
        visual, drop = dropped
        if self.image_floor > 0:
            if self.floor_score == "distinct":
                score = distinctness(attention["values"], rows.image_id[visual])
            else:
                score = attention["dual_attention"].sum.mean(dim=0)
            overview = None if rows.overview is None or self.floor_from == "image" else rows.overview[visual]
            floor = image_floor_keep(rows.image_id[visual], score, self.image_floor, overview)
            drop &= ~floor
        dropped = visual[drop]
        if self.separators == "with_row":
            dropped = torch.cat([dropped, emptied_row_separators(rows.modality, dropped)]).sort().values
        decision = keep_all_but(dropped, layer_idx, rows)
        if decision is not None and self._reserves(rows):
            protected = visual[floor] if self.image_floor > 0 and self.turn_floor else None
            return PrefillKeep(decision.keep, layers=tuple(range(rows.num_layers)), to_reserve=True,
                               protected=protected)
        return decision

    def _reserves(self, rows: Rows) -> bool:
        """Whether Stage 1's dropped tokens are set aside rather than deleted [ours]: "auto" when
        no text follows the last image, i.e. the question is still to come."""
        if self.reserve != "auto":
            return self.reserve == "on"
        image = (rows.modality == Modality.IMAGE).nonzero().squeeze(-1)
        after = rows.modality[int(image[-1]) + 1 :] if image.numel() else rows.modality[:0]
        return not bool((after == Modality.TEXT).any())

    # --- Stage 2: running scores, rounds and the bin ---

    @property
    def score_decay(self) -> float:
        return self.gamma

    def prefill_score_request(self, layer_idx: int, rows: Rows) -> AttentionRequest | None:
        if self.broadcast and layer_idx != self.score_layer:  # only the deciding layer keeps scores
            return None
        return AttentionRequest(rows=torch.tensor([len(rows) - 1]))  # what the last prompt token attends to

    def resolve_budget(self, layer_idx: int, prompt_length: int, held: int) -> int | None:
        return held if self.budget is None else resolve_budget(self.budget, prompt_length)

    def priority(self, view: LayerView) -> torch.Tensor:
        return self._weights(view.modality) * view.scores.mean(dim=0)

    def bin_priority(self, view: LayerView) -> torch.Tensor:
        return self._weights(view.bin_modality) * view.bin_scores.mean(dim=0)

    def bin_capacity(self, budget: int) -> int:
        return budget // 4 if self.bin_size is None else self.bin_size

    def representative_layer(self) -> int | None:
        return self.score_layer if self.broadcast else None

    # --- a new turn: Stage 1 again, with the question [ours] ---

    def wants_question_probe(self) -> bool:
        return self.turn_restore

    def question_layer(self) -> int | None:
        return self.score_layer

    def turn_swap(self, layer_idx: int, view: LayerView, question: QuestionAttention, budget: int | None):
        """Stage 1's rule with the question at last: over the image tokens held and those set
        aside (the reserve, and the bin's), keep as many as are held now: each image's floor from
        the prefill (`turn_floor`), then every token some head and query of the question needs
        (m_j >= r_i * max m), then the best by its share g_j; the others leave for the reserve.
        The attended size stays."""
        held = (view.modality == Modality.IMAGE).nonzero().squeeze(-1).cpu()
        reserved = (view.reserve_modality == Modality.IMAGE).nonzero().squeeze(-1)
        binned = (view.bin_modality == Modality.IMAGE).nonzero().squeeze(-1)
        if not held.numel() or not (reserved.numel() or binned.numel()):
            return None
        g = torch.cat([question.held[:, held].mean(dim=0), question.reserve[:, reserved].mean(dim=0),
                       question.bin[:, binned].mean(dim=0)])
        m = torch.cat([question.held_max[:, held].amax(dim=0), question.reserve_max[:, reserved].amax(dim=0),
                       question.bin_max[:, binned].amax(dim=0)])
        needed = m >= self.r_i * m.max()
        rank = g + needed.float() * (g.max() + 1)  # the needed first, each group by its share
        if self.turn_floor and view.protected is not None and view.protected.numel():
            index = torch.cat([view.token_index.cpu()[held], view.reserve_index[reserved], view.bin_index[binned]])
            rank = rank + torch.isin(index, view.protected).float() * 2 * (g.max() + 1)  # the floor before all
        keep = torch.zeros_like(needed)
        keep[rank.topk(held.numel()).indices] = True
        count = held.numel()
        out = held[~keep[:count]]
        back_reserve = reserved[keep[count : count + reserved.numel()]]
        back_bin = binned[keep[count + reserved.numel():]]
        if not out.numel():
            return None
        return TurnSwap(out, back_reserve, back_bin, to_bin=self.reserve == "off")

    def _weights(self, modality: torch.Tensor) -> torch.Tensor:
        visual = visual_rows(modality)
        return torch.where(visual, self.w_visual, self.w_text).float()


def image_floor_keep(image_of: torch.Tensor, score: torch.Tensor, floor: float, overview: torch.Tensor | None = None) -> torch.Tensor:
    """`[N_vis]` bool: in each image k, `ceil(floor * n_k)` of its tokens, the best-scored of its
    overview (global view) where the image has one, else of all its tokens; so no image is
    starved, whatever share of the instruction's attention it drew."""
    keep = torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    image_of = image_of.to(score.device)
    overview = torch.zeros_like(keep) if overview is None else overview.to(score.device)
    for image in image_of.unique().tolist():
        members = (image_of == image).nonzero().squeeze(-1)
        count = math.ceil(floor * members.numel())
        pool = members[overview[members]] if bool(overview[members].any()) else members
        keep[pool[score[pool].topk(min(count, pool.numel())).indices]] = True
    return keep


def emptied_row_separators(modality: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """The separators whose row, the run of image tokens just before them, is all in `dropped`
    [ours]. A separator with no image token before it (one that opens a view) is not a row's."""
    image = modality == Modality.IMAGE
    gone = torch.zeros_like(image)
    gone[dropped.to(image.device)] = True
    separators = (modality == Modality.SEPARATOR).nonzero().squeeze(-1).tolist()
    out, start = [], 0
    for s in separators:
        row = image[start:s]
        if bool(row.any()) and bool(gone[start:s][row].all()):
            out.append(s)
        start = s + 1
    return torch.tensor(out, dtype=torch.long, device=dropped.device)


def distinctness(values: torch.Tensor, image_of: torch.Tensor) -> torch.Tensor:
    """`[N_vis]`: cosine distance of each token's values (`[H_kv, N_vis, D]`, heads joined) from
    the mean of its own image's: background patches sit near it, what is drawn stands out."""
    joined = values.permute(1, 0, 2).reshape(values.shape[1], -1).float()
    image_of = image_of.to(joined.device)
    score = torch.empty(joined.shape[0], device=joined.device)
    for image in image_of.unique().tolist():
        members = (image_of == image).nonzero().squeeze(-1)
        mean = joined[members].mean(dim=0, keepdim=True)
        score[members] = 1 - torch.nn.functional.cosine_similarity(joined[members], mean, dim=-1)
    return score
