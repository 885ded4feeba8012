"""Measure a checkpoint on easy-VQA through hae's own engine (`hae_cli.evaluation`'s
`ItemRunner` under the full cache): the path `hae eval` and `hae ask` take, from reading the
image to the greedy answer, so a drift in image or prompt layout shows as lost accuracy.

An answer is right when it is the expected text exactly (a story: the target's tokens exactly),
stricter than `hae eval`'s normalised match: the demo model was trained on these very words.
"""

from __future__ import annotations

from collections.abc import Sequence

from hae_cli.evaluation.matching import Setting
from hae_cli.evaluation.records import Item, Question
from hae_cli.evaluation.runner import EvalConfig, ItemRunner
from hae_testing.data import easyvqa

FULL_CACHE = (Setting("full", "full"),)


def full_cache_answers(loaded, items: Sequence[Item], task: str, max_new_tokens: int) -> list[dict]:
    """Each item's answers under the full cache, greedy: {"answers": [text], "token_ids": [ids]}
    (one per question, in turn for a conversation)."""
    runner = ItemRunner(EvalConfig(task=task, plan=FULL_CACHE, max_new_tokens=max_new_tokens), loaded=loaded)
    answered = []
    for item in items:
        result = runner.run(item)
        if "error" in result:
            raise RuntimeError(result["error"])
        answered.append(result["settings"]["full"])
    return answered


def _paths(image_ids: Sequence[int], split: str) -> tuple[str, ...]:
    return tuple(str(easyvqa.image_path(i, split)) for i in image_ids)


def vqa_accuracy(loaded, questions: Sequence[easyvqa.Question], split: str = "test") -> dict:
    """Exact-match accuracy of the one-word answers."""
    items = [Item(str(k), _paths([q.image_id], split), (Question(q.question),), f"question {k}")
             for k, q in enumerate(questions)]
    answers = [a["answers"][0] for a in full_cache_answers(loaded, items, "ask", max_new_tokens=2)]
    wrong = [(q, answer) for q, answer in zip(questions, answers) if answer != q.answer]
    correct = len(questions) - len(wrong)
    return {"correct": correct, "total": len(questions), "accuracy": correct / max(1, len(questions)), "wrong": wrong}


def story_exact_match(loaded, image_sets: Sequence[Sequence[int]], split: str = "test") -> dict:
    """Share of image sets whose whole story matches the target token for token (each decoding
    up to its target's length + 4 tokens)."""
    targets = [loaded.tokenizer.encode(easyvqa.story_target(list(ids), split), add_special_tokens=False)
               for ids in image_sets]
    wrong: list[tuple[list[int], str]] = []
    for length in sorted({len(t) for t in targets}):  # one decode length per run
        chosen = [(list(ids), t) for ids, t in zip(image_sets, targets) if len(t) == length]
        items = [Item(str(k), _paths(ids, split), (Question(easyvqa.STORY_PROMPT),), f"set {k}")
                 for k, (ids, _) in enumerate(chosen)]
        for (ids, target), answered in zip(chosen, full_cache_answers(loaded, items, "story", length + 4)):
            if answered["token_ids"][0] != target:
                wrong.append((ids, loaded.tokenizer.decode(answered["token_ids"][0])))
    correct = len(image_sets) - len(wrong)
    return {"correct": correct, "total": len(image_sets), "accuracy": correct / max(1, len(image_sets)), "wrong": wrong}


def conversation_accuracy(loaded, conversations, split: str = "test") -> dict:
    """Share of the questions answered right in conversations (`conversation_sets`): the images
    fed once, then each question after them into the same cache (`hae eval --task chat`)."""
    items = [Item(str(k), _paths(ids, split), tuple(Question(t.question) for t in turns), f"conversation {k}")
             for k, (ids, turns) in enumerate(conversations)]
    answered = full_cache_answers(loaded, items, "chat", max_new_tokens=3)
    wrong = [(list(ids), turn.question, turn.answer, answer)
             for (ids, turns), a in zip(conversations, answered) for turn, answer in zip(turns, a["answers"])
             if answer != turn.answer]
    total = sum(len(turns) for _, turns in conversations)
    return {"correct": total - len(wrong), "total": total, "accuracy": (total - len(wrong)) / max(1, total),
            "wrong": wrong}
