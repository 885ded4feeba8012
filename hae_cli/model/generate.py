"""Prefill, one decode step, and the one loop around them (gpt-fast style).

Rotary positions are always passed explicitly, in the model's own shape: after eviction the
cache's length is not the next position, and some models' positions are not a count at all.
A cache that has `begin_tokens` / `end_step` (our `EvictingCache`) is told what each forward
carries and when a step ends; a plain `DynamicCache` works too.

`decode` is the loop every caller uses (`generate` here, conversations, the benchmarks):
whether the last token is fed, how a stop is asked for, and what Ctrl-C does are the
caller's choices.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hae_cli.checks import finite_logits
from hae_cli.model.compiled import CompiledStep
from hae_cli.model.eager_step import decode_one_token, notify
from hae_cli.model.sampling import SamplingConfig

__all__ = [
    "Decoded", "Generation", "SamplingConfig", "decode", "decode_one_token", "feed_question", "generate", "prefill",
    "sample",
]


def prefill(model, embeds: torch.Tensor, tokens, position_ids: torch.Tensor, cache) -> torch.Tensor:
    """Run prompt rows (`tokens`: their `PromptTokens`, for the tags) at `position_ids`; returns
    the last row's logits `[vocab]`. The cache's first forward is the one policies prune."""
    notify(cache, "begin_tokens", tokens.modality, tokens.image_id, tokens.overview)
    logits = model.forward(embeds, position_ids, cache, tokens=tokens).logits[0, -1]
    notify(cache, "end_step")
    finite_logits(logits, model)
    return logits


def feed_question(model, embeds: torch.Tensor, tokens, position_ids: torch.Tensor, cache) -> torch.Tensor:
    """A new turn's question (after images or answers already cached): where the cache's policy
    asks for it, fed first as a probe whose attention brings back what the question needs, then
    fed for real; returns the last row's logits."""
    wants_probe = getattr(cache, "wants_question_probe", None)
    if wants_probe is not None and wants_probe():
        cache.begin_tokens(tokens.modality, tokens.image_id, tokens.overview, probe=True)
        model.forward(embeds, position_ids, cache, tokens=tokens)
        cache.end_probe()
    return prefill(model, embeds, tokens, position_ids, cache)


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


@dataclass
class Decoded:
    """What `decode` produced so far (filled in place, so a caller that catches an interruption
    still has it)."""

    token_ids: list[int] = field(default_factory=list)
    stopped_by: str = "length"  # "stop_token", "length" or "interrupt"
    position: int = 0  # the rotary position of the next token to feed


def decode(
    model,
    cache,
    logits: torch.Tensor,
    position: int,
    sampling: SamplingConfig,
    *,
    stop_ids: set[int],
    generator: torch.Generator | None = None,
    max_new_tokens: int | None = None,
    feed_last: bool = False,
    should_stop: Callable[[], bool] | None = None,
    on_token: Callable[[int], None] | None = None,
    on_step: Callable[[], None] | None = None,
    decoded: Decoded | None = None,
    feed: Callable[[int, int], torch.Tensor] | None = None,
) -> Decoded:
    """Sample from `logits`, feed the token at `position`, repeat: until a stop id, `max_new_tokens`
    (default: the sampling's), or `should_stop()` after a step.

    `feed_last`: also feed the last token (a conversation keeps its whole transcript in the
    cache); otherwise the loop ends without feeding it. `on_token(id)` runs for each token
    kept, `on_step()` after each step. Results go into `decoded` (a new one by default).
    `feed(token, position)` feeds a token and returns the next logits (a `CompiledStep`; default:
    `decode_one_token`)."""
    out = decoded if decoded is not None else Decoded()
    out.position = position
    limit = sampling.max_new_tokens if max_new_tokens is None else max_new_tokens
    while len(out.token_ids) < limit:
        token = sample(logits, sampling, generator)
        if token in stop_ids:
            out.stopped_by = "stop_token"
            break
        out.token_ids.append(token)
        if on_token is not None:
            on_token(token)
        if len(out.token_ids) == limit and not feed_last:
            break
        logits = feed(token, out.position) if feed is not None else decode_one_token(model, token, out.position, cache)
        out.position += 1
        if on_step is not None:
            on_step()
        if should_stop is not None and should_stop():
            out.stopped_by = "interrupt"
            break
    return out


@dataclass
class Generation:
    token_ids: list[int] = field(default_factory=list)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    stopped_by: str = "length"  # "stop_token", "length" or "interrupt"
    first_logits: torch.Tensor | None = None  # logits after prefill, for agreement checks
    compile_seconds: float = 0.0  # the compiled step's warm-up (not in decode_seconds)
    notes: list[str] = field(default_factory=list)  # a compile that fell back to eager
    timed_tokens: int | None = None  # the tokens decode_seconds covers, where not all (`--compile`)


@torch.inference_mode()
def generate(
    model,
    tokens,
    embeds: torch.Tensor,
    cache,
    config: SamplingConfig,
    *,
    stop_ids: set[int] | None = None,
    on_token: Callable[[int], None] | None = None,
    on_step: Callable[[], None] | None = None,
    context_length: int | None = None,
    compile: bool = False,
    on_compile: Callable[[float | None], None] | None = None,
) -> Generation:
    """Greedy or sampled decoding of a prompt (`tokens`, `embeds`). Ctrl-C during decoding
    returns what was generated.

    `context_length`: feed the prompt's first tokens alone (the cache compresses them as a
    prompt), then the rest as a second forward, as when a question arrives after its images
    were cached: the question cannot steer what the cache keeps.

    `compile`: decode through a compiled step (`CompiledStep`; the same tokens); `on_compile` is
    called with None as its warm-up starts and with its seconds when it ends."""
    generator = torch.Generator().manual_seed(config.seed) if config.temperature > 0 else None
    stop_ids = model.stop_ids if stop_ids is None else stop_ids
    result = Generation()
    start = time.perf_counter()
    length = embeds.shape[1]
    if context_length is not None and not 0 < context_length < length:
        raise ValueError(f"context_length must be in [1, {length - 1}] for a {length}-token prompt, got {context_length}")
    position_ids, position = model.position_ids(tokens, 0)
    if context_length is None:
        logits = prefill(model, embeds, tokens, position_ids, cache)
    else:
        prefill(model, embeds[:, :context_length], tokens.rows(0, context_length),
                position_ids[..., :context_length], cache)
        if on_step is not None:
            on_step()
        logits = feed_question(model, embeds[:, context_length:], tokens.rows(context_length),
                               position_ids[..., context_length:], cache)
    result.first_logits = logits.float().cpu()
    result.prefill_seconds = time.perf_counter() - start
    if on_step is not None:
        on_step()
    start = time.perf_counter()
    decoded = Decoded()
    step = compiled_step(model, cache, config.max_new_tokens, on_compile) if compile else None
    try:
        decode(model, cache, logits, position, config, stop_ids=stop_ids, generator=generator,
               on_token=on_token, on_step=on_step, decoded=decoded, feed=step)
    except KeyboardInterrupt:
        decoded.stopped_by = "interrupt"
    result.token_ids, result.stopped_by = decoded.token_ids, decoded.stopped_by
    result.decode_seconds = time.perf_counter() - start
    if step is not None:
        result.compile_seconds = step.warmup_seconds or 0.0
        result.decode_seconds, result.timed_tokens = after_first_call(step, result.decode_seconds - result.compile_seconds,
                                                                      len(decoded.token_ids))
        result.notes += [step.note] if step.note else []
    return result


def after_first_call(step, seconds: float, tokens: int) -> tuple[float, int | None]:
    """(decode seconds, the tokens they cover) with a compiled step: the time after its first
    call and the tokens drawn after it. The first call compiles (or finds its graph) and pays
    for more than a step: counted in, a one-token answer showed 4 tok/s beside 370 eager. With
    no token after it there is no speed to show (0 tokens)."""
    if step.first_call_end is None:  # no compiled call (the answer ended first, or it fell back to eager)
        return seconds, None
    return time.perf_counter() - step.first_call_end, max(0, tokens - 1)


def compiled_step(model, cache, max_new_tokens: int, on_compile: Callable[[float | None], None] | None = None):
    """A `CompiledStep` over `cache`, with room made for `max_new_tokens` tokens (one more
    when the last token is fed too)."""
    step = CompiledStep(model, cache, on_compile=on_compile)
    step.make_room(max_new_tokens + 1)
    return step
