"""One generated token fed eagerly: the step `decode` runs, and the one a compiled step falls
back to (both import it from here, so neither imports the other)."""

from __future__ import annotations

import torch

from hae_cli.cache.modality import Modality
from hae_cli.checks import finite_logits


def notify(cache, name: str, *args) -> None:
    """Tell a cache that has the hook (our `EvictingCache`); a plain `DynamicCache` has none."""
    hook = getattr(cache, name, None)
    if hook is not None:
        hook(*args)


def decode_one_token(model, token_id: int, position: int, cache) -> torch.Tensor:
    """Feed one generated token at rotary `position`; returns the next logits `[vocab]`."""
    embeds = model.embed_ids(torch.tensor([token_id]))
    notify(cache, "begin_tokens", torch.tensor([Modality.GENERATED], dtype=torch.int8), torch.zeros(1, dtype=torch.int16))
    logits = model.forward(embeds, model.decode_position_ids(position), cache).logits[0, -1]
    notify(cache, "end_step")
    finite_logits(logits, model)
    return logits
