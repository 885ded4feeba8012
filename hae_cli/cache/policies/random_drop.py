"""Random: drop image tokens uniformly at random, the baseline a pruning method must beat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from hae_cli.cache.modality import Modality
from hae_cli.cache.policies.base import Policy, PrefillKeep, Rows, check_budget, check_int, param, resolve_budget
from hae_cli.cache.policies.dual_attention import keep_all_but


@dataclass
class RandomPolicy(Policy):
    """Random visual-token dropping, the control of every token-pruning study: UniPruneBench
    ("Can Visual Input Be Compressed? A Visual Token Compression Benchmark for Large
    Multimodal Models", https://arxiv.org/abs/2511.02650) found it a strong
    baseline that many published methods do not beat.

    At prefill, before the first layer computes anything past its attention, image tokens are
    dropped uniformly at random (a seeded draw) until the layer holds `budget` tokens; text and
    separators are always kept, and every later layer holds the same tokens (index
    broadcasting). Decoding appends without evicting.
    """

    name: ClassVar[str] = "random"

    budget: int | float = param(0.5, "tokens per layer after prefill; int = a count, float in (0, 1] = a fraction "
                                     "of the prompt. Only image tokens are dropped to reach it.")
    seed: int = param(0, "the seed of the draw: the same seed drops the same tokens of the same prompt.")

    def __post_init__(self) -> None:
        if self.budget is None:
            self.budget = 0.5
        check_budget(self.budget)
        check_int("seed", self.seed, 0)

    def prefill_keep(self, layer_idx: int, rows: Rows, attention: dict) -> PrefillKeep | None:
        if layer_idx != 0:
            return None
        image = (rows.modality == Modality.IMAGE).nonzero().squeeze(-1)
        room = resolve_budget(self.budget, rows.prompt_length) - rows.past - (len(rows) - image.numel())
        drop = image.numel() - max(0, room)
        if drop <= 0:
            return None
        draw = torch.Generator().manual_seed(self.seed)
        dropped = image[torch.randperm(image.numel(), generator=draw)[:drop].to(image.device)]
        return keep_all_but(dropped, layer_idx, rows)

    def resolve_budget(self, layer_idx: int, prompt_length: int, held: int) -> None:
        return None  # no decode-time eviction
