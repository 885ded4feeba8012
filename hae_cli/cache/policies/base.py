"""What a policy is: it says what it needs to see and decides; the cache does the rest.

A policy is a small `@dataclass` whose fields are its parameters, each declared with `param`
(its default and a one-line meaning, which `hae policies` and `--help` show), validated in
`__post_init__` (raising `ConfigError`). The core every policy has (the defaults do nothing,
so `full` implements none):

at prefill (once, per layer, in layer order)
  `prefill_requests(layer_idx, rows)` -> `{name: AttentionRequest | ValueRequest}`: attention
    rows to compute, or value vectors to read (`ValueRequest`)
  `prefill_keep(layer_idx, rows, attention)` -> `PrefillKeep | None`: which rows survive

running scores (a policy with `score_decay` set)
  every token carries `s <- score_decay * s + a_t`, `a_t` the attention it received at step t
  (head-group mean, per key head), in the bin too (the attention it would have received).
  `prefill_score_request(layer_idx, rows)`: the prompt rows whose attention starts the scores.

decode rounds (a layer holding `budget + buffer` tokens is brought back to `budget`)
  `resolve_budget`, `protected` (the `sink` and `recent` rows), `priority(view)` (higher =
  keep; `[N]` for every head or `[H_kv, N]` per head, from a read-only `LayerView`).

What only some policies do is an optional capability the cache asks for
(`policies/capabilities.py`): a recycle bin (`UsesRecycleBin`), one layer's decision followed
by all (`FollowsOneLayer`), a new turn's question swapping tokens back (`SwapsForQuestion`).
The cache keeps the scores, compacts, moves tokens to and from the bin, records events.
A policy that only scores tokens and keeps the best derives from `ScorerPolicy`
(`policies/scorer.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from hae_cli.cache.attention import AttentionRequest, AttentionSummary
from hae_cli.cache.modality import Modality
from hae_cli.errors import ConfigError


@dataclass(frozen=True)
class Rows:
    """The tokens of the current forward as one layer receives them (pruned rows are absent)."""

    index: torch.Tensor  # [q] int64: each token's index in feed order
    modality: torch.Tensor  # [q] int8
    image_id: torch.Tensor  # [q] int16
    past: int  # tokens the layer held before this forward: row i is key `past + i`
    prompt_length: int  # tokens fed so far, this forward's included
    num_layers: int
    overview: torch.Tensor | None = None  # [q] bool: an image's global-view features (None: unknown)

    def __len__(self) -> int:
        return self.index.numel()


@dataclass(frozen=True)
class PrefillKeep:
    """A prefill decision: keep rows `keep` of this forward (indices into the layer's rows).

    `keep` is `[n]` (the same rows in every head) or `[H_kv, n]` (per head: only its own layer).
    `layers`: cache layers compacted to it now. `broadcast`: the hidden states are pruned too,
    so later layers never compute the dropped rows (index broadcasting). `to_reserve`: the
    dropped rows are not deleted but set aside in every layer's reserve, off the attention path,
    for a later question to bring back (`turn_swap`); every layer then computes them, and the
    decision applies to each layer once it has run. `protected`: rows (of `keep`) a later
    question may not swap out (`LayerView.protected`), for a rule that holds whatever is asked.
    """

    keep: torch.Tensor
    layers: tuple[int, ...]
    broadcast: bool = False
    to_reserve: bool = False  # the dropped rows go to every layer's reserve (computed by all layers)
    protected: torch.Tensor | None = None  # [p] rows of this forward that stay through later turns


@dataclass(frozen=True)
class LayerView:
    """What a policy may read of a layer at a round: the running scores and modality tags of the
    tokens it holds and of those in its recycle bin (views, not copies: read, never write)."""

    scores: torch.Tensor  # [H_kv, N] float32
    modality: torch.Tensor  # [N] int8: the rows' tags (the first head's; shared rows are alike in every head)
    bin_scores: torch.Tensor | None  # [H_kv, M] float32, on the host (None: the bin never held a token)
    bin_modality: torch.Tensor  # [M] int8

    reserve_modality: torch.Tensor | None = None  # [R] int8
    # token indices (feed order) of the held rows, the reserve's and the bin's, and of the tokens a
    # prefill protected from later turns' swaps (`PrefillKeep.protected`)
    token_index: torch.Tensor | None = None  # [N]
    reserve_index: torch.Tensor | None = None  # [R]
    bin_index: torch.Tensor | None = None  # [M]
    protected: torch.Tensor | None = None  # [P]

    @classmethod
    def of(cls, layer, aside) -> "LayerView":
        """The view of a layer's storage and what lies beside it (`LayerAside`)."""
        bin_, reserve = aside.bin, aside.reserve
        return cls(layer.scores, layer.modality[0], bin_.scores, bin_.modality, reserve.modality,
                   layer.token_index[0], reserve.token_index, bin_.token_index, reserve.protected)

    @property
    def held(self) -> int:
        return self.scores.shape[-1]


def param(default, help: str):
    """A policy parameter: its default and its meaning (one line, shown by `hae policies`)."""
    return field(default=default, metadata={"help": help})


def parameter_help(cls: type) -> dict[str, str]:
    """{parameter: its meaning} for a policy class."""
    import dataclasses

    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}


class Policy:
    """The core of every policy: prefill decisions, running scores, decode rounds."""

    name: ClassVar[str] = ""
    per_head: ClassVar[bool] = False  # decode rounds choose tokens per key head
    # decode rounds; policies that evict while decoding override these as fields
    budget: int | float | None = None
    buffer: int = 0
    sink: int = 0
    recent: int = 0

    def bind(self, num_layers: int) -> None:
        """Called once the model depth is known: check layer-index parameters against it."""

    # --- prefill ---

    def prefill_requests(self, layer_idx: int, rows: Rows) -> dict[str, AttentionRequest]:
        return {}

    def prefill_keep(
        self, layer_idx: int, rows: Rows, attention: dict[str, AttentionSummary]
    ) -> PrefillKeep | None:
        return None

    # --- running scores ---

    score_decay: float | None = None

    def prefill_score_request(self, layer_idx: int, rows: Rows) -> AttentionRequest | None:
        return None

    # --- decode rounds ---

    def resolve_budget(self, layer_idx: int, prompt_length: int, held: int) -> int | None:
        """The decode budget B of a layer once the prompt is in (None: the layer only grows)."""
        return resolve_budget(self.budget, prompt_length)

    def protected(self, budget: int) -> tuple[int, int]:
        """(sink, recent) rows never evicted; never more than the budget."""
        sink = min(self.sink, budget)
        return sink, min(self.recent, budget - sink)

    def priority(self, view: "LayerView") -> torch.Tensor:
        return view.scores if self.per_head else view.scores.mean(dim=0)


def resolve_budget(budget: int | float | None, prompt_length: int) -> int | None:
    """int: tokens per layer; float in (0, 1]: that fraction of the prompt (at least 1 token)."""
    if budget is None:
        return None
    if isinstance(budget, float):
        return max(1, int(budget * prompt_length))
    return budget


def visual_rows(modality: torch.Tensor) -> torch.Tensor:
    """Image feature tokens and their separators: the rows decode rounds treat as visual."""
    return (modality == Modality.IMAGE) | (modality == Modality.SEPARATOR)


# --- validation: one line naming the parameter and what it may be ---


def check_budget(budget, name: str = "budget") -> None:
    if budget is None:
        return
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ConfigError(f"{name} must be a token count >= 1 or a fraction in (0, 1], got {budget!r}")
    if isinstance(budget, int) and budget < 1:
        raise ConfigError(f"{name} must be a token count >= 1 or a fraction in (0, 1], got {budget}")
    if isinstance(budget, float) and not 0.0 < budget <= 1.0:
        raise ConfigError(f"{name} must be a token count >= 1 or a fraction in (0, 1], got {budget}")


def check_int(name: str, value, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"{name} must be an integer {allowed}, got {value!r}")


def check_float(name: str, value, low: float, high: float | None = None, *, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        if high is None:
            allowed = f"> {low}" if low_open else f">= {low}"
        else:
            allowed = f"in {'(' if low_open else '['}{low}, {high}]"
        raise ConfigError(f"{name} must be a number {allowed}, got {value!r}")


def check_layer(name: str, value: int, low: int, num_layers: int) -> None:
    if not low <= value < num_layers:
        raise ConfigError(
            f"{name} must be in [{low}, {num_layers - 1}] for a {num_layers}-layer model, got {value}"
        )
