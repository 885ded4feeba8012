"""Prefill, one decode step, and the loop around them (gpt-fast style).

Positions are always passed explicitly: after eviction the cache's length is not the
next position. A cache that has `begin_tokens` / `end_step` (our `EvictingCache`) is told
what each forward carries and when a step ends; a plain `DynamicCache` works too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hae_cli.cache.modality import Modality
from hae_cli.model.sampling import SamplingConfig

__all__ = ["Generation", "SamplingConfig", "decode_one_token", "generate", "prefill", "sample"]


@dataclass
class Generation:
    token_ids: list[int] = field(default_factory=list)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    stopped_by: str = "length"  # "stop_token", "length" or "interrupt"
    first_logits: torch.Tensor | None = None  # logits after prefill, for agreement checks


def _notify(cache, name: str, *args) -> None:
    hook = getattr(cache, name, None)
    if hook is not None:
        hook(*args)


def prefill(model, inputs_embeds, modality, image_id, cache, start: int = 0, overview=None) -> torch.Tensor:
    """Run prompt tokens from position `start` (0: the first forward, the one policies prune);
    returns the last position's logits `[vocab]`. `overview`: the images' global-view slots."""
    positions = torch.arange(start, start + inputs_embeds.shape[1], device=inputs_embeds.device)
    _notify(cache, "begin_tokens", positions, modality, image_id, overview)
    logits = model.forward_embeds(inputs_embeds, positions, cache).logits[0, -1]
    _notify(cache, "end_step")
    return logits


def decode_one_token(model, token_id: int, position: int, cache) -> torch.Tensor:
    device = model.device
    embeds = model.language_model.model.embed_tokens(torch.tensor([[token_id]], device=device))
    positions = torch.tensor([position], device=device)
    _notify(
        cache,
        "begin_tokens",
        positions,
        torch.tensor([Modality.GENERATED], dtype=torch.int8),
        torch.zeros(1, dtype=torch.int16),
    )
    logits = model.forward_embeds(embeds, positions, cache).logits[0, -1]
    _notify(cache, "end_step")
    return logits


def sample(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None) -> int:
    if config.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / config.temperature, dim=-1)
    if config.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > config.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@torch.inference_mode()
def generate(
    model,
    inputs_embeds: torch.Tensor,
    modality: torch.Tensor,
    image_id: torch.Tensor,
    cache,
    config: SamplingConfig,
    stop_ids: set[int],
    on_token: Callable[[int], None] | None = None,
    on_step: Callable[[], None] | None = None,
    context_length: int | None = None,
    overview: torch.Tensor | None = None,
) -> Generation:
    """Greedy or sampled decoding. Ctrl-C during decoding returns what was generated.

    `context_length`: feed the prompt's first tokens alone (the cache compresses them as a
    prompt), then the rest as a second forward, as when a question arrives after its images
    were cached: the question cannot steer what the cache keeps."""
    generator = torch.Generator().manual_seed(config.seed) if config.temperature > 0 else None
    result = Generation()
    start = time.perf_counter()
    length = inputs_embeds.shape[1]
    if context_length is not None and not 0 < context_length < length:
        raise ValueError(f"context_length must be in [1, {length - 1}] for a {length}-token prompt, got {context_length}")
    if overview is None:
        overview = torch.zeros(length, dtype=torch.bool)
    if context_length is None:
        logits = prefill(model, inputs_embeds, modality, image_id, cache, overview=overview)
    else:
        context, rest = slice(0, context_length), slice(context_length, length)
        prefill(model, inputs_embeds[:, context], modality[context], image_id[context], cache, overview=overview[context])
        if on_step is not None:
            on_step()
        logits = prefill(
            model, inputs_embeds[:, rest], modality[rest], image_id[rest], cache, start=context_length, overview=overview[rest]
        )
    result.first_logits = logits.float().cpu()
    result.prefill_seconds = time.perf_counter() - start
    if on_step is not None:
        on_step()
    position = inputs_embeds.shape[1]
    start = time.perf_counter()
    try:
        for _ in range(config.max_new_tokens):
            token = sample(logits, config, generator)
            if token in stop_ids:
                result.stopped_by = "stop_token"
                break
            result.token_ids.append(token)
            if on_token is not None:
                on_token(token)
            if len(result.token_ids) == config.max_new_tokens:
                break
            logits = decode_one_token(model, token, position, cache)
            position += 1
            if on_step is not None:
                on_step()
    except KeyboardInterrupt:
        result.stopped_by = "interrupt"
    result.decode_seconds = time.perf_counter() - start
    return result
