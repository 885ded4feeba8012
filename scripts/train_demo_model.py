"""Train the demo model: a small Phi-3.5-Vision, in the official layout, on easy-VQA.

Phi-3.5-V's weights cannot be had here, so `--model demo` is a model of the same structure
(CLIP tower with the 336/14 geometry, 2x2 merge, sub_GN/glb_GN separators, MLP projection,
Phi-3 decoder) but narrow, trained from scratch on CPU on two skills through the chat
template:

1. VQA: an easy-VQA question about one image, answered with one word.
2. Story: 2-8 images, then `STORY_PROMPT`; the answer is "Image 1: a red triangle. ...".

An image's prompt prefix (`<s><|user|>\\n` + its 313 slots + `\\n`) is the same for all of its
~10 questions, so each training sequence is a tree: the prefix once, then every question and
its answer as a branch that attends to the prefix and to itself only, with the positions a
lone prompt would have. That is exactly the loss of the ~10 separate prompts, for ~1/6 of
the compute. Stories are ordinary sequences.

Run from the repository root:
    python scripts/train_demo_model.py                 # trains and writes hae_cli/demo_model/
    python scripts/train_demo_model.py --measure 5     # time 5 steps of each kind and exit
    python scripts/train_demo_model.py --evaluate-only # evaluate the shipped model
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from hae_cli.data import easyvqa
from hae_cli.data.evaluate import Runner, story_exact_match, vqa_accuracy
from hae_cli.model.image import ImageProcessorConfig, ProcessedImage, load_image, preprocess
from hae_cli.api import load_model
from hae_cli.model.loading import DEMO_MODEL_DIR
from hae_cli.model.prompt import build_prompt, user_message
from hae_cli.model.tiny import TINY_VISION, build_model, save_checkpoint
from hae_cli.model.tiny_tokenizer import build_tiny_tokenizer

SEED = 1234
NUM_CROPS = 1  # a 64x64 image -> one 336x336 crop + the global view -> 313 slots
TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4)
# 336/14 as in the official tower; with layer_idx -2 the first 2 of 3 layers feed the projection.
VISION = {**TINY_VISION, **dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2, projection_dim=64)}
# Story lengths 2-8, the short ones (cheaper) more often.
STORY_SIZES = (2, 3, 4, 5, 6, 7, 8)
STORY_WEIGHTS = (3, 3, 3, 2, 1, 1, 1)


@dataclass
class TrainConfig:
    seed: int = SEED
    steps: int = 1300  # the schedule; a VQA step is 4 images, a story step one set of 2-8
    minutes: float = 40.0  # hard wall-clock cap (the machine is shared); stops early if hit
    threads: int = 2
    vqa_images_per_step: int = 4
    story_every: int = 2  # one story step after every this many VQA steps
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.01
    init_from: Path | None = None  # continue from this checkpoint (a second stage)
    # The image projection starts at the scale of the token embeddings (std 0.02), not at
    # PyTorch's default (~100x larger): with huge image rows in the residual stream the
    # decoder layers barely change them and learning stalls.
    projection_init_std: float = 0.02
    vision_width: int = VISION["hidden_size"]


# --------------------------------------------------------------------------- sequences


@dataclass
class Sequence:
    """One training sequence: ids (image k's slots hold -k), positions, a bool attention mask
    (True = attend), and the target id at each row (-100 = no loss)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    images: list[ProcessedImage]


class Examples:
    """Tokenised training examples, built with the runtime's own prompt code."""

    def __init__(self, tokenizer, image_config: ImageProcessorConfig, split: str = "train") -> None:
        self.tokenizer = tokenizer
        self.image_config = image_config
        self.split = split
        self.end_id = tokenizer.convert_tokens_to_ids("<|end|>")
        self.by_image: dict[int, list[easyvqa.Question]] = {}
        for q in easyvqa.load_split(split):
            self.by_image.setdefault(q.image_id, []).append(q)
        self.image_ids = sorted(self.by_image)
        self.captioned_ids = sorted(easyvqa.image_attributes(split))
        self._answer_ids: dict[str, list[int]] = {}

    def image(self, image_id: int) -> ProcessedImage:
        return preprocess(load_image(easyvqa.image_path(image_id, self.split)), self.image_config)

    def target_ids(self, text: str) -> list[int]:
        if text not in self._answer_ids:
            self._answer_ids[text] = self.tokenizer.encode(text, add_special_tokens=False) + [self.end_id]
        return self._answer_ids[text]

    def vqa_tree(self, image_id: int) -> Sequence:
        """The image's prefix once, then each question + answer as a branch."""
        image = self.image(image_id)
        prompts = [
            build_prompt(self.tokenizer, user_message(q.question, 1), [image]).input_ids
            for q in self.by_image[image_id]
        ]
        # The shared prefix ends with the "\n" after the image slots.
        prefix_len = int((prompts[0] == -1).nonzero().max()) + 2
        prefix = prompts[0][:prefix_len]
        branches = []
        for prompt, q in zip(prompts, self.by_image[image_id]):
            assert torch.equal(prompt[:prefix_len], prefix)
            question = prompt[prefix_len:].tolist()
            branches.append((question, self.target_ids(q.answer)))
        return _tree(prefix.tolist(), branches, [image])

    def story(self, image_ids: list[int]) -> Sequence:
        images = [self.image(i) for i in image_ids]
        prompt = build_prompt(self.tokenizer, user_message(easyvqa.STORY_PROMPT, len(images)), images).input_ids
        target = self.target_ids(easyvqa.story_target(image_ids, self.split))
        return _tree([], [(prompt.tolist(), target)], images)


def _tree(prefix: list[int], branches: list[tuple[list[int], list[int]]], images) -> Sequence:
    """Concatenate `prefix` and the `(prompt, target)` branches; each branch sees the prefix and
    itself, causally, at the positions it would have alone; loss on the targets only."""
    ids, positions, labels, branch_of = list(prefix), list(range(len(prefix))), [-100] * len(prefix), [-1] * len(prefix)
    for b, (prompt, target) in enumerate(branches):
        tokens = prompt + target
        ids += tokens
        positions += range(len(prefix), len(prefix) + len(tokens))
        # row t predicts token t+1: the rows from the last prompt token to the one before <|end|>
        labels += [-100] * (len(prompt) - 1) + target + [-100]
        branch_of += [b] * len(tokens)
    n = len(ids)
    branch = torch.tensor(branch_of)
    pos = torch.tensor(positions)
    index = torch.arange(n)
    causal = index[:, None] >= index[None, :]
    same_or_prefix = (branch[None, :] == -1) | (branch[:, None] == branch[None, :])
    return Sequence(torch.tensor(ids), pos, causal & same_or_prefix, torch.tensor(labels), images)


def collate(sequences: list[Sequence]):
    """Right-pad to one length; padding rows attend only to themselves and carry no loss."""
    length = max(s.input_ids.numel() for s in sequences)
    batch = len(sequences)
    ids = torch.zeros(batch, length, dtype=torch.long)
    positions = torch.zeros(batch, length, dtype=torch.long)
    labels = torch.full((batch, length), -100, dtype=torch.long)
    mask = torch.eye(length, dtype=torch.bool).repeat(batch, 1, 1)
    for b, s in enumerate(sequences):
        n = s.input_ids.numel()
        ids[b, :n], positions[b, :n], labels[b, :n] = s.input_ids, s.position_ids, s.labels
        mask[b, :n, :n] = s.mask
    return ids, positions, mask[:, None], labels


# --------------------------------------------------------------------------- model


def batch_loss(model, sequences: list[Sequence]) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the target tokens of a batch of sequences."""
    ids, positions, mask, labels = collate(sequences)
    hidden = torch.cat([model.embed(SimpleNamespace(input_ids=ids[b]), s.images) for b, s in enumerate(sequences)])
    backbone = model.language_model.model
    cos, sin = backbone.rotary_emb(hidden, position_ids=positions)
    for layer in backbone.layers:
        hidden = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=(cos, sin))
    rows = labels != -100
    logits = model.language_model.lm_head(backbone.norm(hidden[rows]))
    return F.cross_entropy(logits.float(), labels[rows]), int(rows.sum())


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine decay to `min_lr_ratio` at the last step."""
    progress = step / config.steps
    warm = min(1.0, (step + 1) / config.warmup_steps)
    cosine = config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return config.lr * warm * cosine


def train(config: TrainConfig, out: Path, measure_steps: int = 0) -> dict:
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    rng = random.Random(config.seed)
    tokenizer = build_tiny_tokenizer(easyvqa.vocabulary())
    vision = {**VISION, "hidden_size": config.vision_width, "intermediate_size": 2 * config.vision_width,
              "num_attention_heads": config.vision_width // 32, "projection_dim": config.vision_width}
    model = build_model(tokenizer, text=TEXT, vision=vision, seed=config.seed)
    with torch.no_grad():
        for layer in model.vision.img_projection:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(std=config.projection_init_std)
                layer.bias.zero_()
    if config.init_from is not None:
        from hae_cli.model.loading import load_checkpoint

        model.language_model.load_state_dict(load_checkpoint(config.init_from).model.language_model.state_dict())
        print(f"continuing from {config.init_from}", flush=True)
    # Training runs plain SDPA with a tree mask; the shipped config keeps the official fields.
    model.config.text._attn_implementation = "sdpa"
    model.vision.img_processor.config._attn_implementation = "sdpa"
    model.train()
    image_config = ImageProcessorConfig(
        num_crops=NUM_CROPS, crop_size=model.config.crop_size, patch_size=model.config.patch_size
    )
    examples = Examples(tokenizer, image_config)
    params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {params:,}  vocab: {len(tokenizer)}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.98),
    )

    def vqa_batches():
        while True:
            order = list(examples.image_ids)
            rng.shuffle(order)
            for i in range(0, len(order) - config.vqa_images_per_step + 1, config.vqa_images_per_step):
                yield "vqa", [examples.vqa_tree(image_id) for image_id in order[i : i + config.vqa_images_per_step]]

    def story_batch():
        n = rng.choices(STORY_SIZES, weights=STORY_WEIGHTS)[0]
        return "story", [examples.story(rng.sample(examples.captioned_ids, n))]

    vqa = vqa_batches()
    budget = config.minutes * 60
    start = time.perf_counter()
    step, log, seen_images = 0, [], 0
    running = {"vqa": [], "story": []}
    timing = {"vqa": [], "story": []}
    while True:
        elapsed = time.perf_counter() - start
        if measure_steps and step >= 2 * measure_steps:
            break
        if not measure_steps and (step >= config.steps or elapsed >= budget):
            break
        kind, batch = story_batch() if (step % (config.story_every + 1) == config.story_every) else next(vqa)
        if measure_steps:
            kind, batch = ("vqa", next(vqa)[1]) if step < measure_steps else story_batch()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        t0 = time.perf_counter()
        loss, tokens = batch_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        timing[kind].append(time.perf_counter() - t0)
        running[kind].append(loss.item())
        seen_images += sum(len(s.images) for s in batch)
        step += 1
        if step % 50 == 0 or measure_steps:
            means = {k: sum(v[-50:]) / max(1, len(v[-50:])) for k, v in running.items()}
            line = (
                f"step {step:5d}  {elapsed / 60:5.1f} min  lr {optimizer.param_groups[0]['lr']:.2e}  "
                f"vqa loss {means['vqa']:.4f}  story loss {means['story']:.4f}  "
                f"s/step vqa {_mean(timing['vqa'][-50:]):.2f} story {_mean(timing['story'][-50:]):.2f}"
            )
            print(line, flush=True)
            log.append(line)
    minutes = (time.perf_counter() - start) / 60
    if step < config.steps and not measure_steps:
        print(f"wall-clock cap hit: stopped at step {step} of {config.steps}", flush=True)
    summary = dict(seed=config.seed, threads=config.threads, steps=step, minutes=round(minutes, 2), images_seen=seen_images, parameters=params)
    if measure_steps:
        print(json.dumps(summary))
        return summary
    model.eval()
    save_checkpoint(model, tokenizer, out, num_crops=NUM_CROPS, shards=2)
    print(f"saved {out} after {step} steps in {minutes:.1f} min", flush=True)
    return summary


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


_worker_runner: Runner | None = None


def _start_worker(folder: str, threads: int) -> None:
    global _worker_runner
    torch.set_num_threads(threads)
    _worker_runner = Runner(load_model(folder))


def _evaluate_part(part: tuple[str, list]) -> dict:
    kind, items = part
    if kind == "vqa":
        return vqa_accuracy(_worker_runner, items)
    return story_exact_match(_worker_runner, items)


def evaluate(folder: Path, vqa_limit: int | None, stories: int, threads: int, workers: int) -> dict:
    """VQA accuracy on the test split (or a seeded subset) and story exact match on seeded
    4-image test sets, through the runtime path with a full cache; `workers` processes share
    the questions."""
    from concurrent.futures import ProcessPoolExecutor

    questions = list(easyvqa.load_split("test"))
    if vqa_limit:
        questions = random.Random(0).sample(questions, vqa_limit)
    sets = easyvqa.story_sets("test", stories, 4, seed=0)
    results = {}
    with ProcessPoolExecutor(workers, initializer=_start_worker, initargs=(str(folder), threads)) as pool:
        for kind, items in (("vqa", questions), ("story", sets)):
            start = time.perf_counter()
            parts = pool.map(_evaluate_part, [(kind, items[w::workers]) for w in range(workers)])
            merged = {"correct": 0, "total": 0, "wrong": []}
            for part in parts:
                for key in merged:
                    merged[key] += part[key]
            merged["accuracy"] = merged["correct"] / max(1, merged["total"])
            print(
                f"{kind}: {merged['correct']}/{merged['total']} = {merged['accuracy']:.4f} "
                f"({time.perf_counter() - start:.0f} s); first misses: {merged['wrong'][:5]}",
                flush=True,
            )
            results[kind] = merged
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEMO_MODEL_DIR, help="checkpoint folder to write")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps, help="optimisation steps")
    parser.add_argument("--minutes", type=float, default=TrainConfig.minutes, help="wall-clock cap on training")
    parser.add_argument("--threads", type=int, default=TrainConfig.threads, help="torch threads (1 is faster on a busy machine)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=TrainConfig.warmup_steps, help="warmup steps")
    parser.add_argument("--story-every", type=int, default=TrainConfig.story_every, help="VQA steps per story step")
    parser.add_argument("--vision-width", type=int, default=TrainConfig.vision_width, help="CLIP tower hidden size")
    parser.add_argument("--init-from", type=Path, default=None, help="continue from this checkpoint folder")
    parser.add_argument("--measure", type=int, default=0, help="time this many steps of each kind, then exit")
    parser.add_argument("--evaluate-only", action="store_true", help="evaluate the checkpoint at --out")
    parser.add_argument("--vqa-limit", type=int, default=None, help="evaluate on a seeded subset of test questions")
    parser.add_argument("--stories", type=int, default=200, help="seeded 4-image story sets to evaluate")
    parser.add_argument("--workers", type=int, default=1, help="evaluation processes")
    args = parser.parse_args()
    if not args.evaluate_only:
        summary = train(TrainConfig(
                seed=args.seed, steps=args.steps, minutes=args.minutes, threads=args.threads,
                lr=args.lr, warmup_steps=args.warmup, init_from=args.init_from,
                story_every=args.story_every, vision_width=args.vision_width,
            ), args.out, args.measure)
        if args.measure:
            return
        print(json.dumps(summary), flush=True)
    results = evaluate(args.out, args.vqa_limit, args.stories, args.threads, args.workers)
    print(json.dumps({k: {m: v[m] for m in ("correct", "total", "accuracy")} for k, v in results.items()}))


if __name__ == "__main__":
    main()
