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

from hae_cli import checks
from hae_cli.api import RunResult, RunSettings, TextStreamer, make_cache, policy_of, policy_parameters, text_notes
from hae_cli.cache.stats import CacheStats
from hae_cli.errors import InputError
from hae_cli.model.generate import (
    Decoded, after_first_call, compiled_step, decode, feed_question, prefill,
)
from hae_cli.model.interface import PromptTokens, UserTurn, check_loaded
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
    start_position: int = 0  # the index of its first fed token
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
    """Questions about `images`, asked one after another into one cache under the settings'
    policy (`RunSettings`, or its fields as keywords: `policy="hae"`, `max_new_tokens=32`, ...).

    `images`: paths, PIL images, or images the model has read already (`loaded.read_image`);
    `image_features`: their vision-tower outputs (`loaded.image_features`), for callers that run
    many conversations over the same images (the benchmark). Each image goes through the tower
    once either way. With `compile` set, answers are decoded through a compiled step (the same
    tokens; the warm-up is paid at the first answer of the process)."""

    def __init__(
        self,
        loaded,
        images: Sequence,
        settings: RunSettings | None = None,
        *,
        image_features: Sequence[torch.Tensor] | None = None,
        on_progress: Callable[[str], None] | None = None,
        **fields,
    ) -> None:
        self.loaded = loaded
        check_loaded(loaded)
        settings = RunSettings.of(settings, fields)
        self.compile = settings.compile  # decode through a compiled step (`CompiledStep`): the same tokens
        checks.callbacks(on_progress=on_progress)
        images = checks.image_list(images, nonempty=True)
        # a bad policy fails before any image is read; sizes past the context are capped with a note
        self._policy, self.notes = checks.fit_to_context(policy_of(settings.policy, settings.policy_params),
                                                         loaded.limits)
        self.policy, self.policy_params = self._policy.name, policy_parameters(self._policy)
        self.sampling = settings.sampling()
        self.on_progress = on_progress  # told what is being read and encoded; None: nobody
        self._generator = torch.Generator().manual_seed(settings.seed) if settings.temperature > 0 else None
        self.image_paths: list[Path | None] = []
        self._images: list = []
        self._features: list[torch.Tensor] = []
        self._add(images, image_features)
        self.resets = 0
        self._earlier: list[tuple[int, Turn]] = []  # the turns before each reset, by conversation
        self.turns: list[Turn] = []
        self._start()
        self.notes += checks.small_budget_note(self._policy, self.prefill_tokens)

    # --- what a user does ---

    def ask(
        self,
        question: str,
        *,
        on_token: Callable[[str], None] | None = None,
        on_step: Callable[[CacheStats], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_compile: Callable[[float | None], None] | None = None,
    ) -> Turn:
        """Feed the question (and any images added since the last turn), decode the answer into
        the cache, return the turn. `should_stop` is asked after every decode step: a True
        ends the answer there, and what was generated stays in the conversation. An exception
        in the middle of a step (a KeyboardInterrupt) leaves the cache cut: the conversation
        then refuses to go on until `reset`."""
        question = checked_text(question, "the question")
        checks.callbacks(on_token=on_token, on_step=on_step, should_stop=should_stop, on_compile=on_compile)
        if self._broken:
            raise InputError("the last turn was cut in the middle of a step; /reset to start over")
        planned = self._next_turn(question)
        tokens = planned.tokens
        limits = self.loaded.limits
        after = self.cache.tokens_fed + len(tokens)
        if after >= limits.context_tokens:
            raise InputError(
                f"this turn would pass the {limits.context_tokens:,} tokens {limits.name} attends over "
                f"({self.cache.tokens_fed:,} so far); /reset to start over"
            )
        room, _ = limits.answer_room(after, self.sampling.max_new_tokens)
        self._broken = True  # until the turn is whole
        start_events, start_overhead = len(self.cache.events), self.cache.eviction_seconds
        steps: list[CacheStats] = []
        streamer = TextStreamer(self.loaded, on_token)

        def publish() -> None:
            steps.append(self.cache.stats())
            if on_step is not None:
                on_step(steps[-1])

        start_index = self.cache.tokens_fed
        began = time.perf_counter()
        with torch.inference_mode():
            position_ids, position = self.loaded.position_ids(tokens, self._position)
            split = tokens.after_images() if planned.images_added else 0
            if split:  # the new images first, compressed as they arrive, as the first turn's were
                prefill(self.loaded, planned.embeds[:, :split], tokens.rows(0, split), position_ids[..., :split],
                        self.cache)
            logits = feed_question(self.loaded, planned.embeds[:, split:], tokens.rows(split),
                                   position_ids[..., split:], self.cache)
            first_logits = logits.float().cpu()
            publish()
            fed_seconds = time.perf_counter() - began
            began = time.perf_counter()
            step = self._compiled_step(room, on_compile)
            warm_before = step.warmup_seconds if step is not None else None
            # every emitted token is fed, so the transcript holds the answer the user saw
            decoded = decode(self.loaded, self.cache, logits, position, self.sampling, stop_ids=self.loaded.stop_ids,
                             generator=self._generator, max_new_tokens=room, feed_last=True,
                             should_stop=should_stop, on_token=streamer.push, on_step=publish, decoded=Decoded(),
                             feed=step)
        compile_seconds = (step.warmup_seconds or 0.0) if step is not None and warm_before is None else 0.0
        decode_seconds, timed_tokens = time.perf_counter() - began - compile_seconds, None
        if step is not None and warm_before is None:  # this turn made the step's first call
            decode_seconds, timed_tokens = after_first_call(step, decode_seconds, len(decoded.token_ids))
        self._broken = False
        self._position = decoded.position
        self._in_cache = len(self._images)
        token_ids = decoded.token_ids
        self._fed += tokens.input_ids.tolist() + token_ids
        text = self.loaded.decode_text(token_ids).strip()
        self.history.append((planned.turn, text))
        result = RunResult(
            policy=self.policy, policy_params=self.policy_params, text=text, token_ids=token_ids, prompt_tokens=tokens.counts_by_modality(),
            prefill_seconds=fed_seconds, decode_seconds=decode_seconds,
            eviction_seconds=self.cache.eviction_seconds - start_overhead, decode_tokens=len(token_ids),
            steps=steps, events=self.cache.events[start_events:], interrupted=decoded.stopped_by == "interrupt",
            stopped_by=decoded.stopped_by, compile_seconds=compile_seconds, timed_tokens=timed_tokens,
            notes=text_notes(self.loaded, question, "the question", len(self._images))
            + ([step.note] if step is not None and step.note else []),
        )
        turn = Turn(len(self.turns) + 1, question, result, planned.images_added, len(tokens),
                    start_index, first_logits)
        self.turns.append(turn)
        return turn

    def add_images(self, images: Sequence, image_features: Sequence[torch.Tensor] | None = None) -> None:
        """Read `images` now (a bad file fails here, before anything changes); they go into the
        next user turn. Before the first question they join the first turn instead (the
        cache is rebuilt with every image, so the prefill compresses them all)."""
        images = checks.image_list(images)
        if not images:
            raise InputError("/images needs at least one image")
        self._add(images, image_features)
        if not self.turns:
            self._start()

    def reset(self) -> None:
        """Forget the turns (`to_json` keeps them); every image so far is fed again into a fresh
        cache, all in the first turn."""
        self._earlier += [(self.resets, turn) for turn in self.turns]
        self.resets += 1
        self._start()

    def _compiled_step(self, room: int, on_compile):
        """The cache's compiled step (made at the first answer), with room for `room` more tokens."""
        if not self.compile:
            return None
        if self._step is None:
            self._step = compiled_step(self.loaded, self.cache, room, on_compile)
        else:
            self._step.make_room(room + 1)
            self._step.on_compile = on_compile
        return self._step

    def _start(self) -> None:
        """A fresh cache with every image so far fed, as the first turn's prefill."""
        self.cache = make_cache(self.loaded, self._policy)
        self._step = None  # the compiled step over this cache, made at the first answer
        self.turns: list[Turn] = []
        self.history: list[tuple[UserTurn, str]] = []  # each user turn with its answer
        self._in_cache = len(self._images)  # images fed; the rest join the next turn
        self._broken = False
        prompt = self.loaded.prompt(self._first_turn(_ANY_QUESTION), self._images)
        context = prompt.after_images()
        with torch.inference_mode():
            embeds = self.loaded.embed(prompt, self._images, self._features)
            position_ids, self._position = self.loaded.position_ids(prompt.rows(0, context), 0)
            prefill(self.loaded, embeds[:, :context], prompt.rows(0, context), position_ids, self.cache)
        self._fed: list[int] = prompt.input_ids[:context].tolist()
        self.prefill_tokens = context
        self.prefill_stats = self.cache.stats()  # the cache once the images are in, compressed
        self.prefill_events = list(self.cache.events)

    def to_json(self) -> dict:
        """The conversation so far: the cache after the images, then every turn (across resets)."""
        from dataclasses import asdict

        every = self._earlier + [(self.resets, turn) for turn in self.turns]
        return {
            "policy": self.policy,
            "policy_params": self.policy_params,
            "images": [str(p) if p is not None else None for p in self.image_paths],
            "resets": self.resets,
            "prefill": {"final_cache": asdict(self.prefill_stats), "events": [asdict(e) for e in self.prefill_events]},
            "turns": [{"conversation": number + 1, **turn.to_json()} for number, turn in every],
        }

    # --- what the tests and the JSON read ---

    @property
    def fed_ids(self) -> list[int]:
        """Every id fed so far, in order (image slots as the model's prompt holds them): the transcript."""
        return list(self._fed)

    @property
    def image_features(self) -> list[torch.Tensor]:
        return list(self._features)

    @property
    def num_images(self) -> int:
        return len(self._images)

    # --- internals ---

    def _say(self, message: str) -> None:
        if self.on_progress is not None:
            self.on_progress(message)

    def _first_turn(self, question: str) -> UserTurn:
        """One image as `hae ask` shows it (the family's own form), several each after its label,
        so a question can name its image."""
        return UserTurn(question, self._in_cache, labelled=self._in_cache != 1)

    def _add(self, images: Sequence, features: Sequence[torch.Tensor] | None = None) -> None:
        """Read, preprocess and encode `images` (nothing changes if one fails)."""
        self.loaded.limits.check_images(len(self._images) + len(images))
        self._say(f"reading {len(images)} image(s)")
        read = [self.loaded.read_image(image) for image in images]
        if features is None:
            self._say(f"encoding {len(images)} image(s)")
            with torch.inference_mode():
                features = self.loaded.image_features(read)
        elif len(features) != len(read):
            raise ValueError(f"{len(features)} image features for {len(read)} images")
        self.image_paths += [Path(image) if isinstance(image, (str, Path)) else None for image in images]
        self._images += read
        self._features += list(features)

    def _next_turn(self, question: str) -> "_PlannedTurn":
        """What this turn feeds; nothing changes until it has been fed."""
        loaded = self.loaded
        if not self.turns:
            turn = self._first_turn(question)
            prompt = loaded.prompt(turn, self._images[: self._in_cache])
            fed = len(self._fed)
            if prompt.input_ids[:fed].tolist() != self._fed:
                raise RuntimeError("the first question changed the ids of the images already fed")
            with torch.inference_mode():
                embeds = loaded.embed(prompt, self._images[: self._in_cache], self._features)[:, fed:]
            return _PlannedTurn(turn, prompt.rows(fed), embeds)
        new = self._images[self._in_cache :]
        first = self._in_cache + 1
        turn = UserTurn(question, len(new), first_image=first, labelled=True)
        tokens = loaded.next_turn(self.history, turn, new)
        with torch.inference_mode():
            embeds = loaded.embed(tokens, new, self._features[self._in_cache :], first_image=first)
        added = [str(p) for p in self.image_paths[self._in_cache :]]
        return _PlannedTurn(turn, tokens, embeds, added)


@dataclass
class _PlannedTurn:
    turn: UserTurn  # the user message as the transcript renders it
    tokens: PromptTokens  # the rows this turn feeds
    embeds: torch.Tensor
    images_added: list[str] = field(default_factory=list)
