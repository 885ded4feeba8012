"""Measure a checkpoint on easy-VQA through the runtime path a user's `hae ask` takes:
load_image -> preprocess -> build_prompt -> model.embed -> generate (greedy).

The cache is a plain transformers `DynamicCache` unless `make_cache` gives another, so the
same functions measure full-cache accuracy and accuracy under an evicting cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from hae_testing.data import easyvqa
from hae_cli.model.generate import SamplingConfig, generate
from hae_cli.model.interface import UserTurn


class Runner:
    """A loaded model (`hae_cli.api.load_model`) answering prompts greedily, each with a fresh
    cache from `make_cache` (a plain `DynamicCache` by default)."""

    def __init__(self, loaded, make_cache: Callable[[], object] | None = None) -> None:
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.make_cache = make_cache or _dynamic_cache
        self._images: dict[tuple[str, int], object] = {}

    def image(self, image_id: int, split: str):
        key = (split, image_id)
        if key not in self._images:
            self._images[key] = self.loaded.read_image(easyvqa.image_path(image_id, split))
        return self._images[key]

    def generate_ids(self, turn: UserTurn, images: list, max_new_tokens: int) -> list[int]:
        prompt = self.loaded.prompt(turn, images)
        with torch.inference_mode():
            embeds = self.loaded.embed(prompt, images)
        result = generate(self.loaded, prompt, embeds, self.make_cache(), SamplingConfig(max_new_tokens=max_new_tokens))
        return result.token_ids


def _dynamic_cache():
    from transformers import DynamicCache

    return DynamicCache()


def vqa_accuracy(runner: Runner, questions: Sequence[easyvqa.Question], split: str = "test") -> dict:
    """Exact-match accuracy of the one-word answers."""
    correct = 0
    wrong: list[tuple[easyvqa.Question, str]] = []
    for q in questions:
        ids = runner.generate_ids(UserTurn(q.question, 1), [runner.image(q.image_id, split)], max_new_tokens=2)
        answer = runner.tokenizer.decode(ids).strip()
        if answer == q.answer:
            correct += 1
        else:
            wrong.append((q, answer))
    return {"correct": correct, "total": len(questions), "accuracy": correct / max(1, len(questions)), "wrong": wrong}


def story_exact_match(runner: Runner, image_sets: Sequence[Sequence[int]], split: str = "test") -> dict:
    """Share of image sets whose whole story matches the target token for token."""
    correct = 0
    wrong: list[tuple[list[int], str]] = []
    for image_ids in image_sets:
        target = runner.tokenizer.encode(easyvqa.story_target(list(image_ids), split), add_special_tokens=False)
        images = [runner.image(i, split) for i in image_ids]
        turn = UserTurn(easyvqa.STORY_PROMPT, len(images), labelled=True)
        ids = runner.generate_ids(turn, images, max_new_tokens=len(target) + 4)
        if ids == target:
            correct += 1
        else:
            wrong.append((list(image_ids), runner.tokenizer.decode(ids)))
    return {"correct": correct, "total": len(image_sets), "accuracy": correct / max(1, len(image_sets)), "wrong": wrong}


def conversation_accuracy(runner: Runner, conversations, split: str = "test", policy: str = "full",
                          policy_params: dict | None = None) -> dict:
    """Share of the questions answered right in conversations (`conversations.conversation_sets`):
    the images fed once, then each question after them into the same cache (`Conversation`)."""
    from hae_cli.conversation import Conversation

    correct = total = 0
    wrong: list[tuple[list[int], str, str, str]] = []
    for image_ids, turns in conversations:
        images = [runner.image(i, split) for i in image_ids]
        conversation = Conversation(runner.loaded, images, policy=policy, policy_params=policy_params, max_new_tokens=3)
        for turn in turns:
            answer = conversation.ask(turn.question).result.text
            total += 1
            if answer == turn.answer:
                correct += 1
            else:
                wrong.append((list(image_ids), turn.question, turn.answer, answer))
    return {"correct": correct, "total": total, "accuracy": correct / max(1, total), "wrong": wrong}
