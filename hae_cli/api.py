"""The library the CLI is a thin layer over: load a model, run a prompt under a policy.

    from hae_cli.api import load_model, run
    loaded = load_model("demo")
    result = run(loaded, ["sample_images/easyvqa_test_0698.png"], "What color is the shape?", policy="hae")
    print(result.text, result.kv_bytes_final, result.full_cache_bytes_final)

`loaded` is a `VisionLanguageModel` (`hae_cli.model.interface`), whatever the family; a policy
is a name with its parameters, or a `Policy` object, checked once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from hae_cli import checks
from hae_cli.cache.stats import CacheStats, EvictionEvent
from hae_cli.errors import ConfigError, InputError
from hae_cli.model.interface import check_loaded
from hae_cli.user_text import checked_text

DEFAULT_STORY_PROMPT = "Describe each image in order."


def load_model(
    model: str = "demo",
    device: str | None = None,
    dtype: str | None = None,
    num_crops: int | None = None,
    on_progress: Callable[[str], None] | None = None,
    image_options: dict[str, int] | None = None,
):
    """Load "demo", a checkpoint folder, or a hub id already in the local HF cache, as the
    `VisionLanguageModel` of its family (read from `config.json`'s `model_type`). `image_options`:
    the family's own resolution settings (`hae families` lists them: Phi-3.5-V's `num_crops`,
    Qwen's `max_pixels`, InternVL's `max_tiles`, ...); `num_crops=N` is `{"num_crops": N}`. Each
    family checks what it can before any weight is read."""
    from hae_cli.model.loading import load_model as load

    checks.model_name(model)
    options = dict(checks.parameter_dict(image_options, "image_options") or {})
    if num_crops is not None:
        options["num_crops"] = num_crops
    return load(model, device, dtype, options=options, on_progress=on_progress)


def policy_of(policy, policy_params: dict | None = None):
    """A `Policy` from a name and parameters (checked here, once), or the `Policy` given."""
    from hae_cli.cache.policies import make_policy

    policy_params = checks.parameter_dict(policy_params)
    if isinstance(policy, str):
        return make_policy(policy, **(policy_params or {}))
    if not isinstance(getattr(policy, "name", None), str):
        raise ConfigError(f"policy must be a policy name or a Policy, got {type(policy).__name__}")
    if policy_params:
        raise ConfigError(f"parameters {sorted(policy_params)} given with a policy object")
    return policy


def policy_settings(policy) -> dict:
    """A policy's parameters that differ from their defaults (what a report names)."""
    import dataclasses

    return {f.name: getattr(policy, f.name) for f in dataclasses.fields(policy) if getattr(policy, f.name) != f.default}


def policy_parameters(policy) -> dict:
    """Every parameter of the policy a run used, defaults and caps included: what a result records,
    so that it says what ran, not what was asked for."""
    import dataclasses

    if not dataclasses.is_dataclass(policy):
        return {}
    return {f.name: getattr(policy, f.name) for f in dataclasses.fields(policy)}


@dataclass
class RunResult:
    policy: str
    text: str
    token_ids: list[int]
    prompt_tokens: dict[str, int]
    prefill_seconds: float  # the model's prefill of the prompt
    decode_seconds: float
    eviction_seconds: float
    decode_tokens: int
    steps: list[CacheStats] = field(default_factory=list)
    events: list[EvictionEvent] = field(default_factory=list)
    interrupted: bool = False
    stopped_by: str = "length"  # "stop_token", "length" or "interrupt"
    image_seconds: float = 0.0  # reading and encoding the images, before the prefill (`run` only)
    notes: list[str] = field(default_factory=list)  # what the run capped, or why the answer is empty
    kept: object | None = None  # KeptMap: what each layer held of each image (asked for with `show_kept`)
    image_layouts: list[dict] = field(default_factory=list)  # per image: how it was cut (`prepare`)
    compile_seconds: float = 0.0  # the compiled decode step's warm-up (`compile=True`), not in decode_seconds
    policy_params: dict = field(default_factory=dict)  # every parameter the policy ran with (`policy_parameters`)
    timed_tokens: int | None = None  # the tokens decode_seconds covers, where not all (a compiled step's first call)

    @property
    def speed_tokens(self) -> int:
        """The decode tokens `decode_seconds` covers."""
        return self.decode_tokens if self.timed_tokens is None else self.timed_tokens

    @property
    def tokens_per_second(self) -> float:
        """0.0 where nothing was timed (a compiled one-token answer: its one step compiled)."""
        return self.speed_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def _final(self, measure: str) -> int:
        return getattr(self.steps[-1], measure) if self.steps else 0

    def _peak(self, measure: str) -> int:
        return max((getattr(s, measure) for s in self.steps), default=0)

    kv_bytes_final = property(lambda self: self._final("bytes_held"))
    kv_bytes_peak = property(lambda self: self._peak("bytes_held"))
    kv_bytes_allocated_final = property(lambda self: self._final("bytes_allocated"))
    kv_bytes_allocated_peak = property(lambda self: self._peak("bytes_allocated"))
    # K/V off the attention path (the bin and the reserve; host memory on CUDA)
    host_bytes_final = property(lambda self: self._final("host_bytes"))
    host_bytes_peak = property(lambda self: self._peak("host_bytes"))
    full_cache_bytes_final = property(lambda self: self._final("full_cache_bytes"))
    full_cache_bytes_peak = property(lambda self: self._peak("full_cache_bytes"))

    @property
    def eviction_share(self) -> float:
        """Eviction work (scoring, compaction, bin traffic) as a share of prefill + decode time."""
        total = self.prefill_seconds + self.decode_seconds
        return self.eviction_seconds / total if total > 0 else 0.0

    def to_json(self) -> dict:
        final = self.steps[-1] if self.steps else None
        from hae_cli.cache.kept_map import kept_json

        return {
            "policy": self.policy,
            "policy_params": self.policy_params,
            "text": self.text,
            "token_ids": self.token_ids,
            "interrupted": self.interrupted,
            "stopped_by": self.stopped_by,
            "notes": self.notes,
            "prompt_tokens": self.prompt_tokens,
            "timings": {
                "image_seconds": self.image_seconds,
                "prefill_seconds": self.prefill_seconds,
                "decode_seconds": self.decode_seconds,
                "eviction_seconds": self.eviction_seconds,
                "eviction_share": self.eviction_share,
                "decode_tokens": self.decode_tokens,
                "decode_tokens_timed": self.speed_tokens,
                "tokens_per_second": self.tokens_per_second,
                "compile_seconds": self.compile_seconds,
            },
            "kv_bytes": {
                "final": self.kv_bytes_final,
                "peak": self.kv_bytes_peak,
                "allocated_final": self.kv_bytes_allocated_final,
                "allocated_peak": self.kv_bytes_allocated_peak,
                "host_final": self.host_bytes_final,
                "host_peak": self.host_bytes_peak,
                "attended_plus_host_final": self.kv_bytes_final + self.host_bytes_final,
                "full_cache_final": self.full_cache_bytes_final,
                "full_cache_peak": self.full_cache_bytes_peak,
            },
            "final_cache": asdict(final) if final else None,
            "events": [asdict(e) for e in self.events],
            **({"kept": kept_json(self.kept, self.image_layouts)} if self.kept is not None else {}),
        }


def make_cache(loaded, policy, policy_params: dict | None = None):
    """A fresh `EvictingCache` for `loaded` under `policy` (a name with `policy_params`, or a `Policy`)."""
    from hae_cli.cache import EvictingCache

    return EvictingCache(policy_of(policy, policy_params), loaded.num_layers)


def user_turn(task: str, question: str | None, num_images: int):
    """What the user says for a task: "ask" (the images, then the question) or "story" (each image
    after its label, then the instruction; by default "Describe each image in order.")."""
    from hae_cli.model.interface import UserTurn

    if task == "ask":
        if question is None:
            raise InputError("a question is needed for `ask`")
        return UserTurn(checked_text(question, "the question"), num_images)
    if task == "story":
        prompt = DEFAULT_STORY_PROMPT if question is None else checked_text(question, "the story prompt")
        return UserTurn(prompt, num_images, labelled=True)
    raise ConfigError(f"unknown task {task!r} (use ask or story)")


def unknown_pieces(tokenizer, text: str) -> list[str]:
    """The pieces of `text` that `tokenizer` reads as its unknown token (any family: ids equal to
    its `unk_token_id`), merged where they touch, in order, once each."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or not text:
        return []
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        spans = [span for token, span in zip(encoded["input_ids"], encoded["offset_mapping"]) if token == unk]
    except (NotImplementedError, TypeError, ValueError, KeyError):  # a slow tokenizer: no offsets; word by word
        spans, at = [], 0
        for word in text.split():
            at = text.index(word, at)
            if unk in tokenizer(word, add_special_tokens=False)["input_ids"]:
                spans.append((at, at + len(word)))
            at += len(word)
    merged: list[list[int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return list(dict.fromkeys(text[start:end].strip() or text[start:end] for start, end in merged))


def text_notes(loaded, text: str | None, what: str, num_images: int) -> list[str]:
    """What the model cannot read in a user's text, one note each: words its tokenizer maps to
    the unknown token (the answer cannot take them into account), and an image number past the
    images there are."""
    from hae_cli.user_text import image_numbers, shown_text

    if not text:
        return []
    notes = []
    unknown = unknown_pieces(loaded.tokenizer, text)
    if unknown:
        model = "the demo model" if getattr(loaded, "name", None) == "demo" else getattr(loaded, "name", "the model")
        words = ", ".join(f"'{shown_text(piece)}'" for piece in unknown[:8]) + (" ..." if len(unknown) > 8 else "")
        unk = getattr(loaded.tokenizer, "unk_token", None) or "unknown"
        known = "; it knows only easy-VQA's words (shapes, colors, yes, no)" if model == "the demo model" else ""
        notes.append(f"{what} has {'a word' if len(unknown) == 1 else 'words'} {model}'s tokenizer does not know: "
                     f"{words}, read as {unk}, so the answer cannot take {'it' if len(unknown) == 1 else 'them'} "
                     f"into account{known}")
    past = [number for number in image_numbers(text) if not 1 <= number <= num_images]
    if past:
        there = f"there is {num_images} image" if num_images == 1 else f"there are {num_images} images"
        named = ", ".join(f"image {number}" for number in past)
        notes.append(f"{what} names {named}, but {there} (image 1{f' to image {num_images}' if num_images > 1 else ''})")
    return notes


@dataclass
class PreparedPrompt:
    """A prompt ready for the decoder: its tokens (with modality tags) and their embeddings."""

    tokens: object  # PromptTokens
    embeds: torch.Tensor  # [1, L, hidden]
    image_layouts: list[dict] = field(default_factory=list)  # per image: how the family cut it
    notes: list[str] = field(default_factory=list)  # what the model cannot read in the user's text (`text_notes`)


def prepare(
    loaded,
    images: Sequence,
    question: str | None,
    *,
    task: str = "ask",
    image_features: list[torch.Tensor] | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> PreparedPrompt:
    """Read the images, build the chat prompt and embed it. The result does not depend on the
    policy, so one prepared prompt can be run under many (`run_prepared`). `images`: paths, PIL
    images, or images the model has read already (`loaded.read_image`)."""
    check_loaded(loaded)
    checks.callbacks(on_progress=on_progress)
    progress = on_progress or (lambda message: None)
    images = checks.image_list(images)
    if not images:
        raise InputError(f"no images given for `{task}`")
    turn = user_turn(task, question, len(images))
    loaded.limits.check_images(len(images))
    progress(f"reading {len(images)} image(s)")
    read = [loaded.read_image(image) for image in images]
    tokens = loaded.prompt(turn, read)
    loaded.limits.check_prompt(len(tokens))
    progress(f"encoding images ({len(tokens)} prompt tokens)")
    with torch.inference_mode():
        embeds = loaded.embed(tokens, read, image_features)
    said = "the question" if task == "ask" else "the story prompt"
    return PreparedPrompt(tokens, embeds, [loaded.image_layout(image) for image in read],
                          text_notes(loaded, question, said, len(images)))


@dataclass(frozen=True)
class RunSettings:
    """How a run generates: the cache's policy (a name with its parameters, or a `Policy`) and
    how tokens are drawn. The one configuration `run`, `run_prepared` and `Conversation` take;
    each also takes these fields as keywords over it (`run(..., policy="snapkv", max_new_tokens=32)`).
    `compile`: decode through a compiled step (the same tokens, faster per token after a warm-up)."""

    policy: object = "hae"
    policy_params: dict | None = None
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    compile: bool = False

    @classmethod
    def of(cls, settings: "RunSettings | None", fields: dict) -> "RunSettings":
        """`settings` (default: the defaults) with `fields` over it, checked: an unknown field, a
        flag that is no bool or sampling out of range is one line, before any image is read."""
        import dataclasses

        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(fields) - set(known))
        if unknown:
            raise ConfigError(f"unknown run setting {unknown[0]!r} (the settings are {', '.join(known)})")
        if settings is not None and not isinstance(settings, cls):
            raise ConfigError(f"settings must be a RunSettings, got {type(settings).__name__}")
        chosen = dataclasses.replace(settings or cls(), **fields)
        checks.flags(compile=chosen.compile)
        chosen.sampling()  # its own checks
        return chosen

    def sampling(self):
        from hae_cli.model.sampling import SamplingConfig

        return SamplingConfig(self.max_new_tokens, self.temperature, self.top_p, self.seed)


def run_prepared(
    loaded,
    prepared: PreparedPrompt,
    settings: RunSettings | None = None,
    *,
    on_token: Callable[[str], None] | None = None,
    on_step: Callable[[CacheStats], None] | None = None,
    context_length: int | None = None,
    show_kept: bool = False,
    kept_step: int | None = None,
    on_compile: Callable[[float | None], None] | None = None,
    **fields,
) -> RunResult:
    """Generate from a prepared prompt with a fresh cache under the settings' policy. With
    `context_length`, the prompt's first tokens are cached (and compressed) before the rest is
    seen (`prepared.tokens.after_images()` splits right after the last image). With `show_kept`,
    `result.kept` is what each layer held of each image after decode step `kept_step` (None:
    at the end; it stays None if the run ended before that step). With `compile` set, `on_compile`
    is called with None as the warm-up starts and with its seconds at its end (`compile_seconds`)."""
    import dataclasses

    from hae_cli.cache.kept_map import image_slots, kept_map
    from hae_cli.model.generate import generate

    settings = RunSettings.of(settings, fields)
    _check_run_arguments(on_token=on_token, on_step=on_step, on_compile=on_compile, show_kept=show_kept,
                         kept_step=kept_step)
    notes = list(prepared.notes)
    tokens = prepared.tokens
    max_new_tokens, capped = loaded.limits.answer_room(len(tokens), settings.max_new_tokens)
    notes += [capped] if capped else []
    sampling = dataclasses.replace(settings, max_new_tokens=max_new_tokens).sampling()
    policy, too_big = checks.fit_to_context(policy_of(settings.policy, settings.policy_params), loaded.limits)
    notes += too_big + checks.small_budget_note(policy, len(tokens))
    cache = make_cache(loaded, policy)
    steps: list[CacheStats] = []
    streamer = TextStreamer(loaded, on_token)
    slots = image_slots(tokens.image_id) if show_kept else []
    kept = None

    def publish_step() -> None:
        nonlocal kept
        stats = cache.stats()
        steps.append(stats)
        if show_kept and stats.step == kept_step:
            kept = kept_map(cache, slots, stats.step)
        if on_step is not None:
            on_step(stats)

    generation = generate(loaded, tokens, prepared.embeds, cache, sampling, on_token=streamer.push,
                          on_step=publish_step, context_length=context_length, compile=settings.compile,
                          on_compile=on_compile)
    notes += generation.notes
    if show_kept and kept_step is None and steps:
        kept = kept_map(cache, slots, steps[-1].step)
    text = loaded.decode_text(generation.token_ids).strip()
    if not text and generation.stopped_by == "stop_token":
        notes.append(
            "no answer: the model ended its turn at once"
            + (" (after special tokens only)" if generation.token_ids else "")
            + "; the question may be outside what it was trained on"
        )
    return RunResult(
        policy=cache.policy.name,
        policy_params=policy_parameters(cache.policy),
        text=text,
        token_ids=generation.token_ids,
        prompt_tokens=tokens.counts_by_modality(),
        prefill_seconds=generation.prefill_seconds,
        decode_seconds=generation.decode_seconds,
        eviction_seconds=cache.eviction_seconds,
        decode_tokens=len(generation.token_ids),
        steps=steps,
        events=list(cache.events),
        interrupted=generation.stopped_by == "interrupt",
        stopped_by=generation.stopped_by,
        notes=notes,
        kept=kept,
        image_layouts=prepared.image_layouts,
        compile_seconds=generation.compile_seconds,
        timed_tokens=generation.timed_tokens,
    )


def run(
    loaded,
    images: Sequence,
    question: str | None,
    settings: RunSettings | None = None,
    *,
    task: str = "ask",
    on_token: Callable[[str], None] | None = None,
    on_step: Callable[[CacheStats], None] | None = None,
    on_progress: Callable[[str], None] | None = None,
    on_prefill: Callable[[], None] | None = None,
    show_kept: bool = False,
    kept_step: int | None = None,
    on_compile: Callable[[float | None], None] | None = None,
    **fields,
) -> RunResult:
    """Answer `question` about `images` (task "ask") or caption them in order (task "story").
    `on_prefill` is called once the images are read and encoded, as the model's prefill starts.
    With `show_kept`, `result.kept` is what each layer held of each image after decode step
    `kept_step` (None: at the end), as `--show-kept` draws it and `to_json()["kept"]` lists it."""
    import dataclasses

    # Bad options fail before any image is read or embedded.
    check_loaded(loaded)
    settings = RunSettings.of(settings, fields)
    _check_run_arguments(on_token=on_token, on_step=on_step, on_compile=on_compile, on_progress=on_progress,
                         on_prefill=on_prefill, show_kept=show_kept, kept_step=kept_step)
    images = checks.image_list(images)
    settings = dataclasses.replace(settings, policy=policy_of(settings.policy, settings.policy_params), policy_params=None)
    start = time.perf_counter()
    prepared = prepare(loaded, images, question, task=task, on_progress=on_progress)
    image_seconds = time.perf_counter() - start
    if on_prefill is not None:
        on_prefill()
    result = run_prepared(loaded, prepared, settings, on_token=on_token, on_step=on_step, show_kept=show_kept,
                          kept_step=kept_step, on_compile=on_compile)
    result.image_seconds = image_seconds
    return result


def _check_run_arguments(*, show_kept, kept_step, **functions) -> None:
    checks.callbacks(**functions)
    checks.flags(show_kept=show_kept)
    checks.step_number(kept_step, "kept_step")


class TextStreamer:
    """Turns token ids into text pieces; decodes the whole answer each time so words join right."""

    def __init__(self, loaded, on_text: Callable[[str], None] | None) -> None:
        self.loaded, self.on_text = loaded, on_text
        self.ids: list[int] = []
        self.sent = ""

    def push(self, token_id: int) -> None:
        self.ids.append(token_id)
        if self.on_text is None:
            return
        text = self.loaded.decode_text(self.ids)
        if text.startswith(self.sent):
            piece, self.sent = text[len(self.sent) :], text
            if piece:
                self.on_text(piece)
