"""One prompt under one setting, with what the comparison needs: the answer, the KV bytes
after every step, and the sizes a matched baseline is given (`Outcome`, `run_prompt`); one
item under every setting of a plan, scored (`ItemRunner`), in whatever process holds the model;
and `hae profile`'s workload under the full cache and each policy, every run kept whole, with
its timings and steps (`run_workload`)."""

from __future__ import annotations

import hashlib
import io
import statistics
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


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
    host_bytes_per_step: list[int] = field(default_factory=list)  # off the attention path: the bin and the reserve
    restored_by_turn: list[int] = field(default_factory=list)  # tokens each turn brought back (all layers)

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
        restored=_restored(result.events),
        binned=sum(sum(e.counts.values()) for e in result.events if e.action == "binned"),
        text=result.text,
        prefill_seconds=result.prefill_seconds,
        decode_seconds=result.decode_seconds,
        host_bytes_per_step=[s.host_bytes for s in result.steps],
        restored_by_turn=[_restored(result.events)],
    )


def _restored(events) -> int:
    return sum(sum(e.counts.values()) for e in events if e.action == "restored")


def run_prompt(loaded, prepared, policy: str, params: dict, max_new_tokens: int, context_length: int | None = None) -> Outcome:
    """Greedy answer under `policy`, with the bytes held after every step (`context_length`:
    the prompt rows cached before the rest is fed; the first step is theirs)."""
    from hae_cli.api import run_prepared

    result = run_prepared(
        loaded, prepared, policy=policy, policy_params=params, max_new_tokens=max_new_tokens, context_length=context_length
    )
    return outcome_of(result)


def run_workload(loaded, workload: Sequence, policies: Sequence[tuple[str, object]], *,
                 on_progress: Callable[[str], None], kept_first: dict, **run_options) -> tuple[dict[str, list], bool]:
    """Each prompt of `workload` (`records.Prompt`s) under each named policy, in order (the full
    cache first: the reference), every `RunResult` kept whole. `kept_first`: `api.run`'s
    show_kept options for the first prompt; `run_options`: the rest of `api.run`'s (sampling,
    compile). Ctrl-C (or a run that says it was interrupted) stops cleanly: (the results so far
    by name, True)."""
    from hae_cli import api

    results: dict[str, list] = {name: [] for name, _ in policies}
    total, done = len(policies) * len(workload), 0
    for number, prompt in enumerate(workload):
        kept = kept_first if number == 0 else {}
        for name, policy in policies:
            done += 1
            label = f"[{done}/{total}] {name} · {prompt.label()}"
            on_progress(label)
            try:
                result = api.run(
                    loaded, list(prompt.images), prompt.question, task=prompt.task, policy=policy,
                    on_progress=lambda message, label=label: on_progress(f"{label}: {message}"),
                    on_compile=lambda seconds, label=label: seconds is None and on_progress(
                        f"{label}: compiling the decode step"),
                    **run_options, **kept,
                )
            except KeyboardInterrupt:
                return results, True
            results[name].append(result)
            if result.interrupted:
                return results, True
    return results, False


# --------------------------------------------------------------------------- one item under a plan


@dataclass(frozen=True)
class EvalConfig:
    """What every worker needs to answer an item the same way: the model, the task, the plan."""

    model: str = "demo"
    device: str | None = None
    dtype: str | None = None
    num_crops: int | None = None
    task: str = "ask"
    plan: tuple = ()  # Settings; full first, each baseline after the HAE setting it matches
    fastv_layer: int = 2
    max_new_tokens: int = 16
    image_options: tuple = ()  # (name, value) pairs: the family's own image options (--image-option)
    question_after: bool = False  # ask: the images cached (and compressed) before the question is fed
    host_and_turns: bool = False  # each result also holds the host bytes and each turn's restores

    def to_json(self) -> dict:
        """What a resumed run must share with the run it continues (image options and the
        options after them only where given, so a run stored before they existed still resumes)."""
        config = {"model": self.model, "device": self.device, "dtype": self.dtype, "num_crops": self.num_crops,
                  "task": self.task, "plan": [s.to_json() for s in self.plan], "fastv_layer": self.fastv_layer,
                  "max_new_tokens": self.max_new_tokens}
        if self.image_options:
            config["image_options"] = dict(self.image_options)
        if self.question_after:
            config["question_after"] = True
        if self.host_and_turns:
            config["host_and_turns"] = True
        return config


class ItemRunner:
    """A model loaded once, answering items greedily under every setting of the plan: the same
    code in this process, in a local worker process and in a Ray actor."""

    IMAGE_SETS_KEPT = 32  # items whose images were read and encoded, for the next items on them

    def __init__(self, config: EvalConfig, loaded=None, threads: int | None = None) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        if loaded is None:
            from hae_cli.api import load_model

            loaded = load_model(config.model, config.device, config.dtype, config.num_crops,
                                image_options=dict(config.image_options))
        self.config, self.loaded = config, loaded
        self._image_sets: OrderedDict = OrderedDict()
        self._fewer_crops: dict = {}
        for setting in config.plan:  # a crop count the model refuses: said before any item runs
            self._model(setting.crops)

    def run(self, item) -> dict:
        """The item's result, as the results file keeps it: per setting the answers, their
        scores and the KV bytes; or the one-line reason the item could not be run."""
        from hae_cli.errors import HaeError

        try:
            answered = self._conversation(item) if self.config.task == "chat" else self._prompt(item)
        except HaeError as error:
            return {"id": item.id, "error": " ".join(f"{item.where}: {error}".split())}
        full_answers = answered["full"][1]
        types = {"types": [q.type for q in item.questions]} if any(q.type for q in item.questions) else {}
        result = {"id": item.id, **types, "settings": {label: setting_result(outcome, answers, full_answers, item.questions,
                                                                    params, self.config.host_and_turns)
                                              for label, (outcome, answers, params) in answered.items()}}
        notes = self._notes(item)
        return {**result, "notes": notes} if notes else result

    def _notes(self, item) -> list[str]:
        """What the model cannot read in the item's questions, each note naming where it is."""
        from hae_cli.api import text_notes

        notes = []
        for number, question in enumerate(item.questions, start=1):
            where = f"{item.where} turn {number}" if len(item.questions) > 1 else item.where
            said = "the instruction" if self.config.task == "story" else "the question"
            users = "\n".join([question.text or "", *question.choices])  # not hae's own instruction to choose
            notes += [f"{where}: {note}" for note in text_notes(self.loaded, users, said, len(item.images))]
        return notes

    # --- the tasks ---

    def _prompt(self, item) -> dict:
        """ask / story: one prompt, prepared once (per crop count), run under each setting; with
        `question_after`, the question fed after the images are cached, so that no policy can
        use it to choose what to keep."""
        from hae_cli.api import prepare

        prepared: dict = {}

        def ready(crops):
            if crops not in prepared:
                loaded = self._model(crops)
                read, features = self._images(item, crops)
                prepared[crops] = loaded, prepare(loaded, read, item.questions[0].prompt, task=self.config.task,
                                                  image_features=features)
            return prepared[crops]

        def context(prompt) -> int | None:
            return prompt.tokens.after_images() if self.config.question_after else None

        def run(setting, params):
            loaded, prompt = ready(setting.crops)
            outcome = run_prompt(loaded, prompt, setting.policy, params, self.config.max_new_tokens, context(prompt))
            return outcome, [(outcome.text, outcome.token_ids)]

        prompt = ready(None)[1]
        fed_later = prompt.embeds.shape[1] - context(prompt) if self.config.question_after else 0
        return self._run_plan(run, prompt.tokens, fed_later)

    def _conversation(self, item) -> dict:
        """chat: the images fed once (the prefill every policy compresses), then each question
        into the same cache, each answer kept."""
        from hae_cli.model.interface import UserTurn

        def run(setting, params):
            read, features = self._images(item, setting.crops)
            return conversation_outcome(self._model(setting.crops), read, features, item.questions, setting.policy,
                                        params, self.config.max_new_tokens)

        read, _ = self._images(item, None)
        first = UserTurn(item.questions[0].prompt, len(read), labelled=len(read) != 1)
        return self._run_plan(run, self.loaded.prompt(first, read))  # the matching counts its image tokens

    def _model(self, crops: int | None):
        """The model, or the same weights reading images at `crops` crops."""
        if crops is None:
            return self.loaded
        if crops not in self._fewer_crops:
            self._fewer_crops[crops] = self.loaded.at_crops(crops)
        return self._fewer_crops[crops]

    def _run_plan(self, run, tokens, fed_later: int = 0) -> dict:
        """label -> (outcome, answers, the parameters it ran with), in the plan's order
        (`fed_later`: prompt rows fed after the compressed context)."""
        from hae_cli.evaluation.matching import run_plan

        answered = {}

        def run_setting(setting, params):
            outcome, answers = run(setting, params)
            answered[setting.label] = (outcome, answers, params)
            return outcome

        run_plan(list(self.config.plan), run_setting, tokens, self.config.fastv_layer, fed_later)
        return answered

    def _images(self, item, crops: int | None = None) -> tuple[list, list]:
        """The item's images read and through the vision tower, once per set of images and crop
        count (an item's images are encoded together: some families cut an image differently
        in company)."""
        import torch

        key = (crops, *(i if isinstance(i, str) else hashlib.sha256(i).hexdigest() for i in item.images))
        if key in self._image_sets:
            self._image_sets.move_to_end(key)
            return self._image_sets[key]
        loaded = self._model(crops)
        read = [loaded.read_image(_picture(source, item.where)) for source in item.images]
        with torch.inference_mode():
            features = loaded.image_features(read)
        self._image_sets[key] = (read, features)
        if len(self._image_sets) > self.IMAGE_SETS_KEPT:
            self._image_sets.popitem(last=False)
        return read, features


def _picture(source, where: str):
    """A path as it is; an image's bytes (a dataset's image column) opened as a picture for the
    one image loader (`load_image`), named after its record."""
    if isinstance(source, str):
        return source
    from PIL import Image, UnidentifiedImageError

    from hae_cli.errors import InputError

    try:
        picture = Image.open(io.BytesIO(source))
    except (UnidentifiedImageError, OSError, ValueError):
        raise InputError("its image is not an image file (or an unsupported format)") from None
    picture.filename = f"the image of {where}"
    return picture


def conversation_outcome(loaded, read, features, questions, policy: str, params: dict,
                         max_new_tokens: int) -> tuple[Outcome, list[tuple[str, list[int]]]]:
    """The questions asked in turn into one `Conversation` under `policy`: the outcome over
    every step (the images' prefill, then each turn's feed and answer), and each answer."""
    from hae_cli.conversation import Conversation

    conversation = Conversation(loaded, read, image_features=features, policy=policy, policy_params=params,
                                max_new_tokens=max_new_tokens)
    steps, events, answers, restored_by_turn = [conversation.prefill_stats], [], [], []
    prefill_seconds = decode_seconds = 0.0
    for question in questions:
        turn = conversation.ask(question.prompt)
        steps += turn.result.steps
        events += turn.result.events
        restored_by_turn.append(_restored(turn.result.events))
        answers.append((turn.result.text, turn.result.token_ids))
        prefill_seconds += turn.result.prefill_seconds
        decode_seconds += turn.result.decode_seconds
    first = conversation.prefill_stats.layers
    outcome = Outcome(
        token_ids=[t for _, ids in answers for t in ids],
        bytes_per_step=[s.bytes_held for s in steps],
        full_bytes_per_step=[s.full_cache_bytes for s in steps],
        held_after_prefill=max(layer.tokens_held for layer in first),
        image_after_prefill=max(layer.tokens_by_modality["image"] for layer in first),
        restored=_restored(events),
        binned=sum(sum(e.counts.values()) for e in events if e.action == "binned"),
        text=answers[-1][0],
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
        host_bytes_per_step=[s.host_bytes for s in steps],
        restored_by_turn=restored_by_turn,
    )
    return outcome, answers


def setting_result(outcome: Outcome, answers, full_answers, questions, params: dict,
                   host_and_turns: bool = False) -> dict:
    """One setting's result on one item: each answer scored, the KV bytes, the timings apart
    (they are the only part that differs between two runs of the same item); with
    `host_and_turns`, also the host bytes (mean, peak) and the tokens each turn restored."""
    from hae_cli.evaluation.metrics import agreement, score_answer

    scored = [score_answer(text, ids, full_ids, q.answers, q.choices)
              for q, (text, ids), (_, full_ids) in zip(questions, answers, full_answers)]
    return {
        "params": params,
        "answers": [text for text, _ in answers],
        "token_ids": [ids for _, ids in answers],
        "metrics": [metric for metric, _ in scored],
        "scores": [score for _, score in scored],
        "same_as_full": [ids == full_ids for (_, ids), (_, full_ids) in zip(answers, full_answers)],
        "agreement": [agreement(ids, full_ids) for (_, ids), (_, full_ids) in zip(answers, full_answers)],
        "kv_mean": outcome.kv_mean,
        "kv_peak": outcome.kv_peak,
        "full_kv_mean": statistics.fmean(outcome.full_bytes_per_step),
        "full_kv_peak": max(outcome.full_bytes_per_step),
        "held_after_prefill": outcome.held_after_prefill,
        "image_after_prefill": outcome.image_after_prefill,
        "restored": outcome.restored,
        "binned": outcome.binned,
        "timings": {"prefill_seconds": outcome.prefill_seconds, "decode_seconds": outcome.decode_seconds,
                    "decode_tokens": sum(len(ids) for _, ids in answers)},
        **({"host_mean": statistics.fmean(outcome.host_bytes_per_step), "host_peak": max(outcome.host_bytes_per_step),
            "restored_by_turn": outcome.restored_by_turn} if host_and_turns else {}),
    }
