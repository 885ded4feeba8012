"""Train the scenes model: a small Phi-3.5-Vision, in the official layout, on the scene world.

The world (`hae_cli/scenes/`) is drawn fresh for every step (train seeds 0 and 1; the benchmarks
test on seed 2), so the model never sees a scene twice. Two stages, as for the easy-VQA demo
model (`scripts/train_demo_model.py`, whose sequence trees and schedule this reuses):

1. vision: the CLIP tower, the 2x2-merge projection and the separators learn, through a
   throw-away linear head on each image token, what the token's cell shows: the colour and
   shape of the object covering it, whether it holds an object's centre, the digit on the
   object's tag (crops only: the global view has no readable digit), and, in the global view,
   where the object is in the image. The scene generator knows every pixel, so every token
   has its targets.
2. language: the vision part is frozen and the Phi-3 decoder learns, at 4 crops an image, to
   answer typed questions about one image (a tree: the image's prompt once, six questions as
   branches), conversations over 2-4 labelled images (3-6 turns, each fed after the answer
   before it, as `hae chat` feeds them), and captions of four images. Two guides lay out the
   circuit (they shape the training only): one head of layer 0 asks each answer row to read
   its question's content words, one of layer 1 to attend to the tokens of the objects the
   question names.

Training is resumable: every `--save-minutes` the state goes to `--state` (outside the
repository), and a run started again with the same `--state` continues from there. The data
of step n depends on n alone, so a resumed run sees what an uninterrupted one would.

    python scripts/train_scenes_model.py --state ~/.cache/hae/scenes_train --out hae_cli/scenes_model
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_demo_model import (  # noqa: E402  (the easy-VQA trainer's sequence trees, schedule and capture)
    GUIDED_ATTENTION,
    AttentionCapture,
    _optimizer_step,
    _schedule,
    _tree,
    init_2d_positions,
    shared_prefix_length,
)

from hae_cli.cache.modality import Modality  # noqa: E402
from hae_cli.model.phi3v.image import ImageProcessorConfig, preprocess  # noqa: E402
from hae_cli.model.phi3v.prompt import (  # noqa: E402
    build_prompt,
    encode_prompt_text,
    next_turn_text,
    story_message,
    user_message,
)
from hae_testing.checkpoints.phi3v import TINY_VISION, build_model, save_checkpoint  # noqa: E402
from hae_testing.checkpoints.phi3v_tokenizer import build_tiny_tokenizer  # noqa: E402
from hae_cli.scenes import QUESTION_TYPES, make_item, vocabulary  # noqa: E402
from hae_cli.scenes.questions import ask as ask_question  # noqa: E402
from hae_cli.scenes.world import COLORS, CROP, SHAPES, object_map  # noqa: E402

NUM_CROPS = 4
# rope_theta 1e6 instead of Phi-3's 10,000: an answer looks up image tokens 700-3,000 positions back,
# and at 10,000 only 3-4 of a 32-dim head's 16 rotary pairs turn by under a radian over that span
# (the rest scramble a content match by distance). With 10,000 the lookup guide's attention on
# the named objects was still 4% after 1,000 language steps, and every type at its prior.
TEXT = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
            rope_theta=1e6)
VISION = {**TINY_VISION, **dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                                projection_dim=64)}
LOOKUP_HEAD = (1, 0)
READ_HEAD = (0, 0)  # the answer row gathers its question's content words here, for the lookup after it
PROBE_LAYER = 1  # the lookup's layer: its output at the answer row should carry what it looked up
NO_DIGIT = 10


@dataclass
class TrainConfig:
    seed: int = 1234
    threads: int = 1
    vision_steps: int = 1500
    vision_batch: int = 4  # scenes a step (5 views each)
    vision_lr: float = 2e-3
    language_steps: int = 6000
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.01
    guide_weight: float = 2.0
    probe_weight: float = 1.0  # the named object's colour, shape and digit, read from the answer row after the lookup
    mix: tuple[str, ...] = ("ask", "chat", "ask", "story", "ask", "chat")
    ask_images_per_step: int = 2
    save_minutes: float = 4.0


# --------------------------------------------------------------------------- targets


def token_targets(scene, image) -> dict[str, torch.Tensor]:
    """Per image token (the `[T]` slots of `image`, separators -100): the covering object's
    colour and shape (last class: background), whether the token's cell holds an object's
    centre, its digit (crops; `NO_DIGIT` where there is none; -100 in the global view), and in
    the global view the object's centre as a share of the image side (`xy`, NaN elsewhere)."""
    ids = object_map(scene)
    side = scene.side
    grid = side // CROP  # crops per side
    objects = scene.objects
    colour_of = torch.tensor([len(COLORS)] + [list(COLORS).index(o.color) for o in objects])
    shape_of = torch.tensor([len(SHAPES)] + [SHAPES.index(o.shape) for o in objects])
    digit_of = torch.tensor([NO_DIGIT] + [int(o.label) for o in objects])
    centre_xy = torch.tensor([[math.nan, math.nan]] + [[o.center[0] / side, o.center[1] / side] for o in objects])

    def cells(cell: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The object covering each cell (by majority, background below a fifth) and the object
        whose centre the cell holds (0: none), row-major."""
        n = side // cell
        blocks = torch.from_numpy(ids.astype(np.int64)).reshape(n, cell, n, cell).permute(0, 2, 1, 3).reshape(n * n, -1)
        counts = F.one_hot(blocks, len(objects) + 1).sum(1)
        counts[:, 0] = 0
        best = counts.argmax(1)
        best[counts.max(1).values < cell * cell // 5] = 0
        centre = torch.zeros(n * n, dtype=torch.long)
        for index, o in enumerate(objects, start=1):
            centre[(o.center[1] // cell) * n + o.center[0] // cell] = index
        return best, centre

    crop_cells, crop_centre = cells(28)  # a merged token of a crop: 28 px of the image
    global_cells, global_centre = cells(28 * grid)
    n = len(image.modalities)
    out = {k: torch.full((n,), -100, dtype=torch.long) for k in ("colour", "shape", "centre", "digit")}
    out["xy"] = torch.full((n, 2), math.nan)
    slots = (image.modalities == Modality.IMAGE).nonzero().squeeze(-1)
    crop_slots, global_slots = slots[: crop_cells.numel()], slots[crop_cells.numel():]
    for rows, covering, centre, is_crop in ((crop_slots, crop_cells, crop_centre, True),
                                            (global_slots, global_cells, global_centre, False)):
        out["colour"][rows] = colour_of[covering]
        out["shape"][rows] = shape_of[covering]
        out["centre"][rows] = (centre > 0).long()
        if is_crop:
            out["digit"][rows] = digit_of[centre]
        else:
            out["xy"][rows] = centre_xy[covering]
    return out


def named_rows(scene, image, names: tuple[str, ...]) -> torch.Tensor:
    """The image's token rows covered by the objects `names` names (crops and global view)."""
    ids = object_map(scene)
    wanted = [i for i, o in enumerate(scene.objects, start=1) if o.name in names]
    if not wanted:
        return torch.zeros(0, dtype=torch.long)
    side, grid = scene.side, scene.side // CROP
    slots = (image.modalities == Modality.IMAGE).nonzero().squeeze(-1)
    rows = []
    for cell, offset in ((28, 0), (28 * grid, (side // 28) ** 2)):
        n = side // cell
        blocks = torch.from_numpy(ids.astype(np.int64)).reshape(n, cell, n, cell).permute(0, 2, 1, 3).reshape(n * n, -1)
        hit = torch.isin(blocks, torch.tensor(wanted)).float().mean(1) >= 0.2
        rows.append(slots[offset + hit.nonzero().squeeze(-1)])
    return torch.cat(rows)


def attributes(scene, names: tuple[str, ...]) -> torch.Tensor:
    """The one named object's colour, shape and digit (class indices), the answer row's probe targets."""
    (o,) = [o for o in scene.objects if o.name in names]
    return torch.tensor([list(COLORS).index(o.color), SHAPES.index(o.shape), int(o.label)])


class AttributeProbe(torch.nn.Module):
    """Reads the named object's colour, shape and digit from the answer row after the lookup
    layer: a gradient straight into what the lookup carries (training only, not saved)."""

    SIZES = (len(COLORS), len(SHAPES), NO_DIGIT)

    def __init__(self, width: int) -> None:
        super().__init__()
        self.out = torch.nn.Linear(width, sum(self.SIZES))

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        parts = self.out(hidden).split(list(self.SIZES), dim=-1)
        return sum(F.cross_entropy(part, targets[:, k]) for k, part in enumerate(parts)) / len(parts)


class TokenHead(torch.nn.Module):
    """The vision stage's throw-away head: each image token's targets (`token_targets`)."""

    SIZES = {"colour": len(COLORS) + 1, "shape": len(SHAPES) + 1, "centre": 2, "digit": NO_DIGIT + 1, "xy": 2}

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.out = torch.nn.Linear(width, sum(self.SIZES.values()))

    def loss(self, tokens: torch.Tensor, targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        parts = dict(zip(self.SIZES, self.out(self.norm(tokens)).split(list(self.SIZES.values()), dim=-1)))
        losses, accuracy = {}, {}
        for name in ("colour", "shape", "centre", "digit"):
            known = targets[name] >= 0
            weight = None
            if name == "digit":  # the digit cells are rare: weigh them as much as all the others
                weight = torch.ones(NO_DIGIT + 1)
                weight[:NO_DIGIT] = 20.0
            if name == "centre":
                weight = torch.tensor([1.0, 20.0])
            losses[name] = F.cross_entropy(parts[name][known], targets[name][known], weight=weight)
            rare = known & ((targets[name] != NO_DIGIT) if name == "digit" else (targets[name] == 1) if name == "centre" else known)
            accuracy[name] = float((parts[name][rare].argmax(-1) == targets[name][rare]).float().mean())
        where = ~targets["xy"][:, 0].isnan()
        losses["xy"] = 10 * F.mse_loss(parts["xy"][where].sigmoid(), targets["xy"][where])
        return sum(losses.values()), accuracy


# --------------------------------------------------------------------------- data


class SceneData:
    """Items of the train seeds, their images processed, and their token sequences."""

    def __init__(self, tokenizer, seed: int) -> None:
        self.tokenizer = tokenizer
        self.seed = seed
        self.image_config = ImageProcessorConfig(num_crops=NUM_CROPS, crop_size=CROP, patch_size=14)
        self.end_id = tokenizer.convert_tokens_to_ids("<|end|>")
        content = [*COLORS, *SHAPES, *(s + "s" for s in SHAPES), "left", "right", "above", "below", "number", "many",
                   "color", "shape", "there"]
        self.content_ids = torch.tensor(tokenizer.convert_tokens_to_ids(content))

    def reads(self, ids: torch.Tensor, answer_rows: list[int], starts: list[int]) -> list[tuple[int, torch.Tensor]]:
        """For each answer row, its question's content-word rows (between `starts[i]` and the row)."""
        out = []
        for row, start in zip(answer_rows, starts):
            words = torch.isin(ids[start:row + 1], self.content_ids).nonzero().squeeze(-1) + start
            out.append((row, words))
        return out

    def item(self, step: int, task: str, images=None, objects=None):
        """The item of step `step` (train seeds: 2 * seed and 2 * seed + 1 alternate)."""
        return make_item(2 * self.seed + step % 2, step, task, NUM_CROPS, images, objects)

    def process(self, scenes) -> list:
        return [preprocess(scene.render(), self.image_config) for scene in scenes]

    def target(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) + [self.end_id]

    def ask_tree(self, step: int) -> dict:
        """One image, a question of every type as branches of one tree."""
        item = self.item(step, "ask")
        scene, rng = item.scenes[0], random.Random(f"train/ask/{self.seed}/{step}")
        questions = [q for q in (ask_question(scene, kind, rng) for kind in QUESTION_TYPES) if q is not None]
        images = self.process(item.scenes)
        prompts = [build_prompt(self.tokenizer, user_message(q.question, 1), images).input_ids for q in questions]
        prefix_len = shared_prefix_length(prompts)
        branches = [(p[prefix_len:].tolist(), self.target(q.answer)) for p, q in zip(prompts, questions)]
        ids, positions, mask, labels, answer_rows = _tree(prompts[0][:prefix_len].tolist(), branches)
        first_slot = int((ids == -1).nonzero()[0])  # the image's rows start after the prompt's opening text
        looks = [(row, first_slot + named_rows(scene, images[0], q.names)) for row, q in zip(answer_rows, questions)]
        probes = [(row, attributes(scene, q.names)) for row, q in zip(answer_rows, questions) if len(q.names) == 1]
        starts = [row - (len(branch) - 1) for row, (branch, _) in zip(answer_rows, branches)]
        return dict(ids=ids, positions=positions, mask=mask, labels=labels, images=images, scenes=item.scenes, looks=looks,
                    reads=self.reads(ids, answer_rows, starts), probes=probes)

    def chat(self, step: int) -> dict:
        """2-4 labelled images, then 3-6 turns, each after the answer before it."""
        item = self.item(step, "chat")
        images = self.process(item.scenes)
        n = len(images)
        first = build_prompt(self.tokenizer, story_message(item.questions[0].question, n), images)
        ids = first.input_ids.tolist()
        messages = [{"role": "user", "content": item.questions[0].question}]
        spans = []
        for t, q in enumerate(item.questions):
            target = self.target(q.answer)
            spans.append((len(ids), len(ids) + len(target), q))
            ids += target[:-1]
            messages.append({"role": "assistant", "content": q.answer})
            if t + 1 == len(item.questions):
                ids.append(self.end_id)
                break
            text = next_turn_text(self.tokenizer, messages, item.questions[t + 1].question)
            ids += encode_prompt_text(self.tokenizer, text, [], opens_chunk=False).input_ids.tolist()
            messages.append({"role": "user", "content": item.questions[t + 1].question})
        labels = torch.full((len(ids),), -100, dtype=torch.long)
        looks, probes = [], []
        slot_start = {k: int((torch.tensor(ids) == -k).nonzero()[0]) for k in range(1, n + 1)}
        for start, stop, q in spans:
            labels[start - 1: stop - 1] = torch.tensor(ids[start:stop])
            local = named_rows(item.scenes[q.image - 1], images[q.image - 1], q.names)
            first_slot = int((images[q.image - 1].modalities == Modality.IMAGE).nonzero()[0])
            looks.append((start - 1, local - first_slot + slot_start[q.image]))
            if len(q.names) == 1:
                probes.append((start - 1, attributes(item.scenes[q.image - 1], q.names)))
        length = len(ids)
        last_slot = int((torch.tensor(ids) < 0).nonzero()[-1])
        starts = [last_slot + 1] + [stop for _, stop, _ in spans[:-1]]
        ids = torch.tensor(ids)
        return dict(ids=ids, positions=torch.arange(length), mask=None, labels=labels, images=images,
                    scenes=item.scenes, looks=looks, reads=self.reads(ids, [start - 1 for start, *_ in spans], starts), probes=probes)

    def story(self, step: int) -> dict:
        item = self.item(step, "story")
        images = self.process(item.scenes)
        prompt = build_prompt(self.tokenizer, story_message(item.questions[0].question, len(images)), images).input_ids
        ids, positions, mask, labels, _ = _tree([], [(prompt.tolist(), self.target(item.questions[0].answer))])
        return dict(ids=ids, positions=positions, mask=mask, labels=labels, images=images, scenes=item.scenes, looks=[],
                    reads=[], probes=[])


# --------------------------------------------------------------------------- stages


def image_tokens(model, image) -> torch.Tensor:
    """The image's token embeddings `[T, hidden]` through the tower and projection."""
    pixels = image.pixel_values.to(model.dtype)
    return model.vision.project_features(model.vision.crop_features(pixels), image.h_crops, image.w_crops)


def train_vision(model, data: SceneData, config: TrainConfig, state: dict, save) -> None:
    vision = model.vision
    head = TokenHead(model.config.text.hidden_size)
    params = list(vision.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.vision_lr, weight_decay=config.weight_decay)
    if "vision_optimizer" in state:
        head.load_state_dict(state["vision_head"])
        optimizer.load_state_dict(state["vision_optimizer"])
    start_step = state.get("vision_step", 0)
    if start_step == 0:
        init_2d_positions(vision.img_processor)
    model.train()
    running = []
    for step in range(start_step, config.vision_steps):
        item = data.item(10_000_000 + step * config.vision_batch, "story", images=(config.vision_batch, config.vision_batch),
                         objects=(3, 12))
        images = data.process(item.scenes)
        tokens = torch.cat([image_tokens(model, image) for image in images])
        per_image = [token_targets(scene, image) for scene, image in zip(item.scenes, images)]
        targets = {k: torch.cat([t[k] for t in per_image]) for k in per_image[0]}
        for group in optimizer.param_groups:
            group["lr"] = config.vision_lr * _schedule(step, config.vision_steps, 50, config.min_lr_ratio)
        loss, accuracy = head.loss(tokens, targets)
        _optimizer_step(optimizer, params, loss)
        running.append((loss.item(), accuracy))
        if (step + 1) % 25 == 0:
            recent = running[-25:]
            means = {k: np.mean([a[k] for _, a in recent]) for k in recent[0][1]}
            print(f"vision step {step + 1:5d}/{config.vision_steps}  loss {np.mean([x for x, _ in recent]):.4f}  "
                  + "  ".join(f"{k} {v:.3f}" for k, v in means.items()), flush=True)
        state["vision_step"] = step + 1
        save(lambda: {"vision_head": head.state_dict(), "vision_optimizer": optimizer.state_dict()})
    vision.requires_grad_(False)


def sequence_loss(model, sequence: dict, capture: AttentionCapture, probe: AttributeProbe
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        features = [image_tokens(model, image) for image in sequence["images"]]
    embeds = model.embed(_Prompt(sequence["ids"]), sequence["images"], image_features=features)
    backbone = model.language_model.model
    positions = sequence["positions"][None]
    mask = sequence["mask"][None, None] if sequence["mask"] is not None else None
    cos, sin = backbone.rotary_emb(embeds, position_ids=positions)
    hidden = embeds
    probed = torch.zeros(())
    for index, layer in enumerate(backbone.layers):
        hidden = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=(cos, sin))
        if index == PROBE_LAYER and sequence["probes"]:
            rows = torch.tensor([row for row, _ in sequence["probes"]])
            probed = probe.loss(hidden[0, rows], torch.stack([t for _, t in sequence["probes"]]))
    targets = sequence["labels"] != -100
    logits = model.language_model.lm_head(backbone.norm(hidden[0, targets]))
    loss = F.cross_entropy(logits.float(), sequence["labels"][targets])
    guide = []
    for row, rows in sequence["looks"]:
        if rows.numel():
            log_probs = capture.log_probs(*LOOKUP_HEAD, 0, torch.tensor([row]))[0]
            guide.append(-log_probs[rows].logsumexp(0))
    for row, rows in sequence["reads"]:  # every content word of the question, evenly
        if rows.numel():
            guide.append(-capture.log_probs(*READ_HEAD, 0, torch.tensor([row]))[0, rows].mean())
    return loss, torch.stack(guide).mean() if guide else torch.zeros(()), probed


class _Prompt:
    def __init__(self, ids: torch.Tensor) -> None:
        self.input_ids = ids


def train_language(model, data: SceneData, config: TrainConfig, state: dict, save) -> None:
    from transformers import AttentionInterface

    capture = AttentionCapture({LOOKUP_HEAD[0], READ_HEAD[0]})
    AttentionInterface.register(GUIDED_ATTENTION, capture)
    model.config.text._attn_implementation = GUIDED_ATTENTION
    probe = AttributeProbe(model.config.text.hidden_size)
    if "language_probe" in state:
        probe.load_state_dict(state["language_probe"])
    params = [p for n, p in model.named_parameters() if not n.startswith("vision") and p.requires_grad]
    params += list(probe.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.98), weight_decay=config.weight_decay)
    if "language_optimizer" in state:
        optimizer.load_state_dict(state["language_optimizer"])
    running: dict[str, list[float]] = {k: [] for k in ("ask", "chat", "story", "guide", "probe")}
    start = time.perf_counter()
    for step in range(state.get("language_step", 0), config.language_steps):
        kind = config.mix[step % len(config.mix)]
        if kind == "ask":
            sequences = [data.ask_tree(step * config.ask_images_per_step + i) for i in range(config.ask_images_per_step)]
        else:
            sequences = [getattr(data, kind)(step)]
        for group in optimizer.param_groups:
            group["lr"] = config.lr * _schedule(step, config.language_steps, config.warmup_steps, config.min_lr_ratio)
        losses = [sequence_loss(model, s, capture, probe) for s in sequences]
        loss = torch.stack([x for x, _, _ in losses]).mean()
        guide = torch.stack([g for _, g, _ in losses]).mean()
        probed = torch.stack([p for _, _, p in losses]).mean()
        _optimizer_step(optimizer, params, loss + config.guide_weight * guide + config.probe_weight * probed)
        running[kind].append(loss.item())
        running["guide"].append(guide.item())
        if kind != "story":
            running["probe"].append(probed.item())
        if (step + 1) % 25 == 0:
            print(f"language step {step + 1:5d}/{config.language_steps}  {(time.perf_counter() - start) / 60:5.1f} min  "
                  + "  ".join(f"{k} {np.mean(v[-12:]):.4f}" for k, v in running.items() if v), flush=True)
        state["language_step"] = step + 1
        save(lambda: {"language_optimizer": optimizer.state_dict(), "language_probe": probe.state_dict()})
    model.config.text._attn_implementation = "sdpa"


def train(config: TrainConfig, out: Path, state_dir: Path) -> None:
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    tokenizer = build_tiny_tokenizer(vocabulary())
    model = build_model(tokenizer, text=TEXT, vision=VISION, seed=config.seed)
    with torch.no_grad():
        for layer in model.vision.img_projection:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(std=0.02)
                layer.bias.zero_()
    model.config.text._attn_implementation = "sdpa"
    model.vision.img_processor.config._attn_implementation = "sdpa"
    state_dir.mkdir(parents=True, exist_ok=True)
    state_file = state_dir / "state.pt"
    state: dict = {}
    if state_file.exists():
        state = torch.load(state_file, weights_only=False)
        model.load_state_dict(state["model"])
        print(f"resumed at vision step {state.get('vision_step', 0)}, language step {state.get('language_step', 0)}",
              flush=True)
    data = SceneData(tokenizer, config.seed)
    last_save = [time.perf_counter()]

    def save(extra, force: bool = False) -> None:
        if not force and time.perf_counter() - last_save[0] < config.save_minutes * 60:
            return
        payload = {**{k: v for k, v in state.items() if k.endswith("_step")}, **extra(), "model": model.state_dict(),
                   "config": asdict(config)}
        torch.save(payload, state_dir / "state.tmp")
        (state_dir / "state.tmp").replace(state_file)  # a kill mid-write leaves the last whole state
        state.update(payload)
        last_save[0] = time.perf_counter()
        print(f"state saved: vision step {state.get('vision_step', 0)}, language step {state.get('language_step', 0)}",
              flush=True)

    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}  vocab: {len(tokenizer)}", flush=True)
    train_vision(model, data, config, state, save)
    model.vision.requires_grad_(False)
    train_language(model, data, config, state, save)
    save(lambda: {}, force=True)
    model.eval()
    save_checkpoint(model, tokenizer, out, num_crops=NUM_CROPS, shards=2)
    print(f"saved {out}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    parser.add_argument("--state", type=Path, required=True, help="folder for the resumable state (outside the repository)")
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--threads", type=int, default=TrainConfig.threads)
    parser.add_argument("--vision-steps", type=int, default=TrainConfig.vision_steps)
    parser.add_argument("--language-steps", type=int, default=TrainConfig.language_steps)
    parser.add_argument("--save-minutes", type=float, default=TrainConfig.save_minutes)
    args = parser.parse_args()
    config = TrainConfig(seed=args.seed, threads=args.threads, vision_steps=args.vision_steps,
                         language_steps=args.language_steps, save_minutes=args.save_minutes)
    print(json.dumps(asdict(config)), flush=True)
    train(config, args.out, args.state)


if __name__ == "__main__":
    main()
