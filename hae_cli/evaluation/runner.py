"""One prompt under one setting, with what the comparison needs: the answer, the KV bytes
after every step, and the sizes a matched baseline is given (`Outcome`, `run_prompt`)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass
class Outcome:
    """One prompt under one setting."""

    token_ids: list[int]
    bytes_per_step: list[int]
    full_bytes_per_step: list[int]
    held_after_prefill: int  # tokens per layer (max over layers)
    image_after_prefill: int  # image tokens per layer (max over layers)
    restored: int = 0
    binned: int = 0
    text: str = ""
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def kv_mean(self) -> float:
        return statistics.fmean(self.bytes_per_step)

    @property
    def kv_peak(self) -> int:
        return max(self.bytes_per_step)


def outcome_of(result) -> Outcome:
    """A `RunResult` (or a conversation turn's) as the comparison reads it."""
    first = result.steps[0].layers
    return Outcome(
        token_ids=result.token_ids,
        bytes_per_step=[s.bytes_held for s in result.steps],
        full_bytes_per_step=[s.full_cache_bytes for s in result.steps],
        held_after_prefill=max(layer.tokens_held for layer in first),
        image_after_prefill=max(layer.tokens_by_modality["image"] for layer in first),
        restored=sum(sum(e.counts.values()) for e in result.events if e.action == "restored"),
        binned=sum(sum(e.counts.values()) for e in result.events if e.action == "binned"),
        text=result.text,
        prefill_seconds=result.prefill_seconds,
        decode_seconds=result.decode_seconds,
    )


def run_prompt(loaded, prepared, policy: str, params: dict, max_new_tokens: int, context_length: int | None = None) -> Outcome:
    """Greedy answer under `policy`, with the bytes held after every step (`context_length`:
    the prompt rows cached before the rest is fed; the first step is theirs)."""
    from hae_cli.api import run_prepared

    result = run_prepared(
        loaded, prepared, policy=policy, policy_params=params, max_new_tokens=max_new_tokens, context_length=context_length
    )
    return outcome_of(result)
