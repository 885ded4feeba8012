"""A conversation over images whose cache survives the turns: `Conversation(loaded, images).ask(q)`.

The images are read, encoded and fed once, as the first forward (the prefill every policy
compresses) before any question is known; each turn then appends to the same cache what the
chat template adds for it (`<|end|>\\n<|user|>\\n...<|end|>\\n<|assistant|>\\n` after the
answer before it) and decodes the answer, which stays in the cache for the next turns. So
the ids fed, turn after turn, are the ids of the whole transcript, and with the full cache
every turn's logits are those of one forward over it (tests/test_conversation.py).

Images added later (`add_images`) go into the next user turn, numbered after the earlier
ones ("Image 3: <|image_3|>"); they are fed as part of that turn, not compressed at prefill.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hae_cli.api import LoadedModel, RunResult, TextStreamer, make_cache
from hae_cli.cache.stats import CacheStats
from hae_cli.errors import InputError
from hae_cli.model.generate import SamplingConfig, decode_one_token, prefill, sample
from hae_cli.model.image import ProcessedImage, load_image, preprocess
from hae_cli.model.prompt import (
    PromptTokens, build_prompt, encode_prompt_text, next_turn_text, story_message, user_message,
)
from hae_cli.user_text import checked_text

# Stands for the first question while the images are fed: the ids up to the last image do
# not depend on it (the text after an image is its own chunk), which `ask` checks.
_ANY_QUESTION = "?"


@dataclass
class Turn:
    """One question and its answer. `result` holds this turn's steps and events only;
    `first_logits` are the logits the answer's first token was drawn from."""

    index: int  # 1-based
    question: str
    result: RunResult
    images_added: list[str] = field(default_factory=list)
    fed_tokens: int = 0  # tokens this turn appended before its answer (template, question, new images)
    start_position: int = 0  # the position of its first fed token
    first_logits: torch.Tensor | None = None

    @property
    def actions(self) -> dict[str, int]:
        """Tokens this turn evicted, binned, restored and deleted from the bin (all layers)."""
        totals = dict.fromkeys(("evicted", "binned", "restored", "deleted"), 0)
        for event in self.result.events:
            totals[event.action] = totals.get(event.action, 0) + sum(event.counts.values())
        return totals

    def to_json(self) -> dict:
        return {
            "turn": self.index,
            "question": self.question,
            "images_added": self.images_added,
            "fed_tokens": self.fed_tokens,
            "start_position": self.start_position,
            "this_turn": self.actions,
            **self.result.to_json(),
        }


class Conversation:
    """Questions about `images`, asked one after another into one cache under `policy`.

    `images`: paths, or images already preprocessed (`preprocess`); `image_features`: their
    vision-tower outputs (`model.image_embeddings`), for callers that run many conversations
    over the same images (the benchmark). Each image goes through the tower once either way."""

    def __init__(
        self,
        loaded: LoadedModel,
        images: Sequence[str | Path | ProcessedImage],
        *,
        image_features: Sequence[torch.Tensor] | None = None,
        policy: str = "hae",
        policy_params: dict | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        on_progress: Callable[[str], None] | None = None,
    ) -> None:
        self.loaded = loaded
        self.policy, self.policy_params = policy, dict(policy_params or {})
        self.sampling = SamplingConfig(max_new_tokens, temperature, top_p, seed)
        make_cache(loaded, policy, self.policy_params)  # a bad policy fails before any image is read
        self.on_progress = on_progress  # told what is being read and encoded; None: nobody
        self._generator = torch.Generator().manual_seed(seed) if temperature > 0 else None
        self.image_paths: list[Path | None] = []
        self._processed: list[ProcessedImage] = []
        self._features: list[torch.Tensor] = []
        self._add(images, image_features)
        self.reset()

    # --- what a user does ---

    def ask(
        self,
        question: str,
        *,
        on_token: Callable[[str], None] | None = None,
        on_step: Callable[[CacheStats], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Turn:
        """Feed the question (and any images added since the last turn), decode the answer into
        the cache, return the turn. `should_stop` is asked after every decode step: a True
        ends the answer there, and what was generated stays in the conversation. An exception
        in the middle of a step (a KeyboardInterrupt) leaves the cache cut: the conversation
        then refuses to go on until `reset`."""
        question = checked_text(question, "the question")
        if self._broken:
            raise InputError("the last turn was cut in the middle of a step; /reset to start over")
        planned = self._next_turn(question)
        tokens = planned.tokens
        room = self.sampling.max_new_tokens
        limits = self.loaded.limits
        if limits is not None:
            after = self.cache.next_position + tokens.input_ids.numel()
            if after >= limits.context_tokens:
                raise InputError(
                    f"this turn would pass the {limits.context_tokens:,} tokens {limits.name} attends over "
                    f"({self.cache.next_position:,} so far); /reset to start over"
                )
            room, _ = limits.answer_room(after, room)
        self._broken = True  # until the turn is whole
        start_events, start_overhead = len(self.cache.events), self.cache.eviction_seconds
        steps: list[CacheStats] = []
        streamer = TextStreamer(self.loaded.tokenizer, on_token)

        def publish() -> None:
            steps.append(self.cache.stats())
            if on_step is not None:
                on_step(steps[-1])

        start_position = self.cache.next_position
        began = time.perf_counter()
        with torch.inference_mode():
            logits = prefill(self.loaded.model, planned.embeds, tokens.modality, tokens.image_id, self.cache,
                             start=start_position, overview=tokens.overview)
            first_logits = logits.float().cpu()
            publish()
            fed_seconds = time.perf_counter() - began
            began = time.perf_counter()
            token_ids, stopped_by = [], "length"
            while len(token_ids) < room:
                token = sample(logits, self.sampling, self._generator)
                if token in self.loaded.stop_ids:
                    stopped_by = "stop_token"
                    break
                token_ids.append(token)
                streamer.push(token)
                # every emitted token is fed, so the transcript holds the answer the user saw
                logits = decode_one_token(self.loaded.model, token, self.cache.next_position, self.cache)
                publish()
                if should_stop is not None and should_stop():
                    stopped_by = "interrupt"
                    break
        decode_seconds = time.perf_counter() - began
        self._broken = False
        self._in_cache = len(self._processed)
        self._fed += tokens.input_ids.tolist() + token_ids
        text = self.loaded.tokenizer.decode(token_ids, skip_special_tokens=True).strip()
        self.messages += [{"role": "user", "content": planned.user_text}, {"role": "assistant", "content": text}]
        result = RunResult(
            policy=self.policy, text=text, token_ids=token_ids, prompt_tokens=tokens.counts_by_modality(),
            prefill_seconds=fed_seconds, decode_seconds=decode_seconds,
            eviction_seconds=self.cache.eviction_seconds - start_overhead, decode_tokens=len(token_ids),
            steps=steps, events=self.cache.events[start_events:], interrupted=stopped_by == "interrupt",
            stopped_by=stopped_by,
        )
        turn = Turn(len(self.turns) + 1, question, result, planned.images_added, tokens.input_ids.numel(),
                    start_position, first_logits)
        self.turns.append(turn)
        return turn

    def add_images(self, images: Sequence[str | Path]) -> None:
        """Read `images` now (a bad file fails here, before anything changes); they go into the
        next user turn. Before the first question they join the first turn instead (the
        cache is rebuilt with every image, so the prefill compresses them all)."""
        if not images:
            raise InputError("/images needs at least one image")
        self._add(images)
        if not self.turns:
            self.reset()

    def reset(self) -> None:
        """Forget the turns; every image so far is fed again into a fresh cache, all in the first turn."""
        self.cache = make_cache(self.loaded, self.policy, self.policy_params)
        self.turns: list[Turn] = []
        self.messages: list[dict] = []
        self._in_cache = len(self._processed)  # images fed; the rest join the next turn
        self._broken = False
        prompt = build_prompt(self.loaded.tokenizer, first_message(_ANY_QUESTION, self._in_cache), self._processed)
        context = prompt.after_images()
        with torch.inference_mode():
            embeds = self.loaded.model.embed(prompt, self._processed, self._features)
            prefill(self.loaded.model, embeds[:, :context], prompt.modality[:context], prompt.image_id[:context],
                    self.cache, overview=prompt.overview[:context])
        self._fed: list[int] = prompt.input_ids[:context].tolist()
        self.prefill_tokens = context
        self.prefill_stats = self.cache.stats()  # the cache once the images are in, compressed
        self.prefill_events = list(self.cache.events)

    # --- what the tests and the JSON read ---

    @property
    def fed_ids(self) -> list[int]:
        """Every id fed so far, in order (image k's slots as -k): the transcript."""
        return list(self._fed)

    @property
    def image_features(self) -> list[torch.Tensor]:
        return list(self._features)

    @property
    def num_images(self) -> int:
        return len(self._processed)

    # --- internals ---

    def _say(self, message: str) -> None:
        if self.on_progress is not None:
            self.on_progress(message)

    def _add(self, images: Sequence[str | Path | ProcessedImage], features: Sequence[torch.Tensor] | None = None) -> None:
        """Read, preprocess and encode `images` (nothing changes if one fails)."""
        if self.loaded.limits is not None:
            self.loaded.limits.check_images(len(self._processed) + len(images))
        self._say(f"reading {len(images)} image(s)")
        processed = [image if isinstance(image, ProcessedImage) else preprocess(load_image(image), self.loaded.image_config)
                     for image in images]
        if features is None:
            self._say(f"encoding {len(images)} image(s)")
            with torch.inference_mode():
                features = self.loaded.model.image_embeddings(processed)
        elif len(features) != len(processed):
            raise ValueError(f"{len(features)} image features for {len(processed)} images")
        self.image_paths += [None if isinstance(image, ProcessedImage) else Path(image) for image in images]
        self._processed += processed
        self._features += list(features)

    def _next_turn(self, question: str) -> "_PlannedTurn":
        """What this turn feeds; nothing changes until it has been fed."""
        tokenizer, model = self.loaded.tokenizer, self.loaded.model
        if not self.turns:
            user_text = first_message(question, self._in_cache)
            prompt = build_prompt(tokenizer, user_text, self._processed[: self._in_cache])
            fed = len(self._fed)
            if prompt.input_ids[:fed].tolist() != self._fed:
                raise RuntimeError("the first question changed the ids of the images already fed")
            with torch.inference_mode():
                embeds = model.embed(prompt, self._processed[: self._in_cache], self._features)[:, fed:]
            return _PlannedTurn(user_text, _rows_from(prompt, fed), embeds)
        new = self._processed[self._in_cache :]
        first = self._in_cache + 1
        user_text = story_message(question, len(new), first=first) if new else question
        text = next_turn_text(tokenizer, self.messages, user_text)
        tokens = encode_prompt_text(tokenizer, text, new, first_image=first, opens_chunk=False)
        with torch.inference_mode():
            embeds = model.embed(tokens, new, self._features[self._in_cache :], first_image=first)
        added = [str(p) for p in self.image_paths[self._in_cache :]]
        return _PlannedTurn(user_text, tokens, embeds, added)


@dataclass
class _PlannedTurn:
    user_text: str  # the user message as the transcript renders it
    tokens: PromptTokens  # the rows this turn feeds
    embeds: torch.Tensor
    images_added: list[str] = field(default_factory=list)


def first_message(question: str, num_images: int) -> str:
    """The first user turn: one image as `hae ask` shows it (the official examples' form), several
    each after its label ("Image 2: <|image_2|>"), so a question can name its image."""
    return user_message(question, 1) if num_images == 1 else story_message(question, num_images)


def _rows_from(prompt: PromptTokens, start: int) -> PromptTokens:
    """The prompt's rows from `start` on."""
    return PromptTokens(
        input_ids=prompt.input_ids[start:],
        modality=prompt.modality[start:],
        image_id=prompt.image_id[start:],
        image_token_counts=[],
        overview=prompt.overview[start:],
    )
