"""Tiny checkpoints of the native VLM families load and run like the real ones.

Each family's writer (`hae_testing/checkpoints/<family>.py`) puts a random checkpoint in the hub layout;
here transformers' own `AutoModelForImageTextToText` and the family's processor (`load_processor`)
load it, and greedy generation must depend on the images with clear logit gaps, so that exactness
tests built on these models mean something. The layout helpers below say where each image token
sits in its picture; the tests check them against the model's own positions and features.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    unpad_image,
)
from transformers.utils import is_torchvision_available

from hae_cli.model.hf_processor import build_without_video, load_processor

torch.set_num_threads(1)

# model_type -> (writer module, model class, image sizes (height, width) that give each image a
# different token grid where the family has native resolution, tiles or anyres crops).
FAMILIES = {
    "qwen2_vl": ("qwen2_vl", "Qwen2VLForConditionalGeneration", [(56, 56), (84, 56), (112, 84)]),
    "qwen2_5_vl": ("qwen2_vl", "Qwen2_5_VLForConditionalGeneration", [(56, 56), (84, 56), (112, 84)]),
    "llava": ("llava", "LlavaForConditionalGeneration", [(56, 56), (80, 40), (40, 90)]),
    "llava_next": ("llava", "LlavaNextForConditionalGeneration", [(40, 90), (90, 40), (80, 80)]),
    # Alone, the first image's crops are pooled (anyres_max_9); with others, each is its base view.
    "llava_onevision": ("llava", "LlavaOnevisionForConditionalGeneration", [(120, 200), (40, 90), (90, 40)]),
    "idefics3": ("idefics3", "Idefics3ForConditionalGeneration", [(60, 120), (120, 60), (100, 100)]),
    "smolvlm": ("idefics3", "SmolVLMForConditionalGeneration", [(100, 200), (200, 100), (150, 150)]),
    # A 2 x 3 grid and its thumbnail, a 2 x 1 grid and its thumbnail, one tile alone.
    "internvl": ("internvl", "InternVLForConditionalGeneration", [(120, 200), (40, 90), (100, 100)]),
    "mistral3": ("mistral3", "Mistral3ForConditionalGeneration", [(56, 112), (112, 56), (84, 84)]),
    "gemma3": ("gemma3", "Gemma3ForConditionalGeneration", [(56, 112), (112, 56), (84, 84)]),
    "qwen3_vl": ("qwen3_vl", "Qwen3VLForConditionalGeneration", [(64, 64), (96, 64), (128, 96)]),
    "qwen3_vl_moe": ("qwen3_vl", "Qwen3VLMoeForConditionalGeneration", [(64, 64), (96, 64), (128, 96)]),
}
VIDEO_SLOT = {"qwen2_vl", "qwen2_5_vl", "llava_onevision", "smolvlm", "internvl", "qwen3_vl", "qwen3_vl_moe"}
# AutoProcessor needs torchvision for these: a video slot, or (Mistral 3's Pixtral) a module that imports it.
AUTO_NEEDS_TORCHVISION = VIDEO_SLOT | {"mistral3"}


@dataclass
class Family:
    model_type: str
    folder: Path
    model: torch.nn.Module
    processor: object
    image_sizes: list[tuple[int, int]]


@pytest.fixture(scope="session", params=list(FAMILIES))
def family(request, tmp_path_factory) -> Family:
    model_type = request.param
    if model_type == "smolvlm":
        pytest.importorskip("num2words", reason="SmolVLMProcessor refuses to build without num2words")
    package, _, image_sizes = FAMILIES[model_type]
    writer = importlib.import_module(f"hae_testing.checkpoints.{package}")
    folder = writer.write_tiny_checkpoint(tmp_path_factory.mktemp(model_type) / "tiny", model_type, seed=0)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    return Family(model_type, folder, model, load_processor(folder), image_sizes)


def pictures(sizes: list[tuple[int, int]], seed: int) -> list[Image.Image]:
    """A coloured rectangle on a background of another colour, both drawn from `seed`: unlike
    noise, two seeds give pictures that differ in every patch's mean."""
    rng = np.random.default_rng(seed)
    images = []
    for height, width in sizes:
        pixels = np.empty((height, width, 3), dtype=np.uint8)
        pixels[:] = rng.integers(0, 256, 3)
        top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
        pixels[top : top + height // 2, left : left + width // 2] = rng.integers(0, 256, 3)
        images.append(Image.fromarray(pixels))
    return images


def conversation(images: list[Image.Image], text: str = "Describe image 1.") -> list[dict]:
    images = [{"type": "image", "image": image} for image in images]
    return [{"role": "user", "content": images + [{"type": "text", "text": text}]}]


def encode(processor, images: list[Image.Image], text: str = "Describe image 1.", **options):
    """The processor on the rendered chat template, as `apply_chat_template(tokenize=True)` calls
    it: a template that writes the BOS itself (Idefics3) must not get a second one."""
    prompt = processor.apply_chat_template(conversation(images, text), add_generation_prompt=True)
    bos = processor.tokenizer.bos_token
    starts_with_bos = bos is not None and prompt.startswith(bos)
    # One list of images per prompt: OneVision reads 2+ images in one list as a multi-image prompt.
    return processor(
        text=[prompt], images=[images], add_special_tokens=not starts_with_bos, return_tensors="pt", **options
    )


def generate(model, inputs) -> tuple[list[int], float]:
    """16 greedy tokens (EOS held off, so that every run has 16) and the first step's top-1/top-2 logit gap."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)  # fmt: skip
    top2 = out.logits[0][0].float().topk(2).values
    return out.sequences[0, inputs["input_ids"].shape[1] :].tolist(), (top2[0] - top2[1]).item()


def test_loads_with_the_real_classes_and_files(family):
    _, model_class, _ = FAMILIES[family.model_type]
    assert type(family.model).__name__ == model_class
    assert family.model.config.model_type == family.model_type
    assert type(family.processor).__name__ == PROCESSOR_MAPPING[type(family.model.config)].__name__
    files = {path.name for path in family.folder.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "preprocessor_config.json", "chat_template.json"} <= files  # fmt: skip


@pytest.mark.parametrize("n_images", [1, 2, 3])
def test_generation_depends_on_the_images(family, n_images):
    sizes = family.image_sizes[:n_images]
    tokens, gap = generate(family.model, encode(family.processor, pictures(sizes, seed=1)))
    other_tokens, _ = generate(family.model, encode(family.processor, pictures(sizes, seed=2)))
    assert len(set(tokens)) > 1
    assert tokens != other_tokens
    assert gap > 1e-3


def test_rendered_prompt_encodes_like_apply_chat_template(family):
    images = pictures(family.image_sizes[:2], seed=1)
    reference = family.processor.apply_chat_template(
        conversation(images), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    ours = encode(family.processor, images)
    assert ours["input_ids"].tolist() == reference["input_ids"].tolist()
    assert torch.equal(ours["pixel_values"], reference["pixel_values"])


def test_processor_built_without_auto_processor_matches_it(family):
    """Where AutoProcessor works without torchvision, the fallback build gives the same processor."""
    if family.model_type in AUTO_NEEDS_TORCHVISION and not is_torchvision_available():
        pytest.skip("AutoProcessor needs torchvision for this family")
    auto = AutoProcessor.from_pretrained(family.folder)
    built = build_without_video(type(auto), family.folder)
    images = pictures(family.image_sizes, seed=3)
    expected, actual = encode(auto, images), encode(built, images)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def test_the_processor_is_built_without_torchvision(family):
    """Where AutoProcessor refuses without torchvision, `load_processor` still builds the family's own
    class (the fixture did), and only a video raises."""
    if family.model_type not in AUTO_NEEDS_TORCHVISION or is_torchvision_available():
        pytest.skip("AutoProcessor builds this processor")
    with pytest.raises((ImportError, ValueError), match="(?i)torchvision"):  # InternVL's says ValueError
        AutoProcessor.from_pretrained(family.folder)
    assert type(family.processor).__name__ == PROCESSOR_MAPPING[type(family.model.config)].__name__
    if family.model_type in VIDEO_SLOT:
        with pytest.raises(ImportError, match="Videos need torchvision"):
            family.processor.video_processor(videos=[np.zeros((2, 32, 32, 3), dtype=np.uint8)])


@pytest.mark.parametrize("n_images", [1, 3])
def test_image_token_layout(family, n_images):
    """Each image token's (image, view, row, col) agrees with the model's own positions or
    features, and with the processor's own expansion of each image."""
    images = pictures(family.image_sizes[:n_images], seed=4)
    inputs = encode(family.processor, images, return_text_replacement_offsets=True)
    expansions = inputs.pop("text_replacement_offsets")[0]
    # the token that receives features: the placeholder, or what Gemma 3 expands it into
    feature = family.processor.tokenizer.image_token if family.model_type == "gemma3" else family.processor.image_token
    tokens_per_image = [expansion["replacement"].count(feature) for expansion in expansions]
    check = {
        "qwen2_vl": check_qwen_layout,
        "qwen2_5_vl": check_qwen_layout,
        "llava": check_llava_layout,
        "llava_next": check_anyres_layout,
        "llava_onevision": check_anyres_layout,
        "idefics3": check_tiles_layout,
        "smolvlm": check_tiles_layout,
        "internvl": check_thumbnail_layout,
        "mistral3": check_row_breaks_layout,
        "gemma3": check_soft_tokens_layout,
        "qwen3_vl": check_qwen_layout,
        "qwen3_vl_moe": check_qwen_layout,
    }[family.model_type]
    tags = check(family, inputs, images)
    assert [sum(1 for tag in tags if tag[0] == image) for image in range(len(images))] == tokens_per_image


# Layout helpers: one tag (image, view, row, col) per image token, in input order.


def qwen_layout(image_grid_thw: torch.Tensor, merge_size: int) -> list[tuple[int, str, int, int]]:
    """Qwen2-VL / 2.5-VL: each image is one run of grid_t x (grid_h / 2) x (grid_w / 2) tokens,
    row-major, between <|vision_start|> and <|vision_end|>."""
    return [
        (image, "image", row, col)
        for image, (t, h, w) in enumerate(image_grid_thw.tolist())
        for _ in range(t)
        for row in range(h // merge_size)
        for col in range(w // merge_size)
    ]


def check_qwen_layout(family, inputs, images):
    config = family.model.config
    tags = qwen_layout(inputs["image_grid_thw"], config.vision_config.spatial_merge_size)
    is_image = inputs["input_ids"][0] == config.image_token_id
    assert len(tags) == int(is_image.sum())
    positions, _ = family.model.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"],
    )  # fmt: skip
    t_h_w = positions[:, 0, is_image].T.tolist()
    first = {}
    for (image, _, row, col), (_, h, w) in zip(tags, t_h_w):
        h0, w0 = first.setdefault(image, (h, w))
        assert (h - h0, w - w0) == (row, col)
    return tags


def llava_layout(n_images: int, image_seq_length: int) -> list[tuple[int, str, int, int]]:
    """LLaVA-1.5: every image is the same square grid of image_seq_length tokens, row-major."""
    side = math.isqrt(image_seq_length)
    return [(image, "image", k // side, k % side) for image in range(n_images) for k in range(image_seq_length)]


def check_llava_layout(family, inputs, images):
    config = family.model.config
    tags = llava_layout(len(images), config.image_seq_length)
    assert len(tags) == int((inputs["input_ids"][0] == config.image_token_index).sum())
    return tags


def anyres_layout(config, image_sizes: torch.Tensor, base_only: bool) -> list[tuple[int, str, int, int]]:
    """LLaVA-NeXT / OneVision: per image the base view (side x side, row-major), then the anyres
    crops stitched, unpadded to the image's aspect ratio, rows of `width` features each followed
    by one newline (col == width). OneVision shrinks the crops to about 9 tiles' worth
    (`anyres_max_9`) and, for 2+ images in a prompt (`base_only`), keeps the base view plus one
    trailing newline (row == side)."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    tags = []
    for image, size in enumerate(image_sizes.tolist()):
        tags += [(image, "base", row, col) for row in range(side) for col in range(side)]
        if base_only:
            tags.append((image, "newline", side, 0))
            continue
        tiles_h, tiles_w = get_anyres_image_grid_shape(
            size, config.image_grid_pinpoints, config.vision_config.image_size
        )
        height, width = unpad_image(torch.empty(1, tiles_h * side, tiles_w * side), size).shape[1:]
        max_tiles = getattr(config, "vision_aspect_ratio", None)
        if max_tiles is not None:
            ratio = math.sqrt(height * width / (int(max_tiles.removeprefix("anyres_max_")) * side**2))
            if ratio > 1.1:
                height, width = int(height // ratio), int(width // ratio)
        tags += [
            (image, "newline" if col == width else "crops", row, col)
            for row in range(height)
            for col in range(width + 1)
        ]
    return tags


def check_anyres_layout(family, inputs, images):
    config, model = family.model.config, family.model.model
    base_only = family.model_type == "llava_onevision" and len(images) > 1
    tags = anyres_layout(config, inputs["image_sizes"], base_only)
    assert len(tags) == int((inputs["input_ids"][0] == config.image_token_index).sum())
    extra = {"batch_num_images": inputs["batch_num_images"]} if "batch_num_images" in inputs else {}
    with torch.no_grad():
        features = model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], **extra).pooler_output
    features = torch.cat(list(features))
    is_newline = torch.tensor([view == "newline" for _, view, _, _ in tags])
    assert torch.equal(features[is_newline], model.image_newline.expand(int(is_newline.sum()), -1))
    assert not torch.isclose(features[~is_newline], model.image_newline).all(dim=-1).any()
    return tags


def tiles_layout(rows: list[int], cols: list[int], image_seq_len: int) -> list[tuple[int, str, int, int]]:
    """Idefics3 / SmolVLM: per image, rows x cols tiles in row-major order (none when the image
    fits one tile: rows = cols = 0), then the global image; every view is a square run of
    image_seq_len tokens, row-major. `view` is "tile r c" (1-based, as in `<row_r_col_c>`) or "global"."""
    side = math.isqrt(image_seq_len)
    views = [
        [f"tile {r} {c}" for r in range(1, n_rows + 1) for c in range(1, n_cols + 1)] + ["global"]
        for n_rows, n_cols in zip(rows, cols)
    ]
    return [
        (image, view, k // side, k % side)
        for image, names in enumerate(views)
        for view in names
        for k in range(image_seq_len)
    ]


def check_tiles_layout(family, inputs, images):
    processor = family.processor
    grid = processor.image_processor(images, return_row_col_info=True)
    rows = [n for sample in grid["rows"] for n in sample]
    cols = [n for sample in grid["cols"] for n in sample]
    tags = tiles_layout(rows, cols, processor.image_seq_len)
    ids = inputs["input_ids"][0].tolist()
    fake_id = processor.tokenizer.convert_tokens_to_ids(processor.fake_image_token)
    image_positions = [i for i, token in enumerate(ids) if token == processor.image_token_id]
    assert len(tags) == len(image_positions)
    for (_, view, row, col), position in zip(tags, image_positions):
        if row or col:
            continue
        # Each view's run follows <fake_token_around_image> and its name, as text or a token.
        fake = max(i for i in range(position) if ids[i] == fake_id)
        name = processor.tokenizer.decode(ids[fake + 1 : position])
        assert name == ("<global-img>" if view == "global" else "<row_{}_col_{}>".format(*view.split()[1:]))
    return tags


def check_thumbnail_layout(family, inputs, images):
    """InternVL: per image `<img>`, its tiles in GotOcr2's grid (none when it fits one tile), the
    thumbnail, `</img>`; every view a square run of image_seq_length tokens. The thumbnail's
    features are those of the whole image resized to one tile, as the model computes them."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    processor, model = family.processor, family.model.model
    image_processor = processor.image_processor
    size = (image_processor.size["height"], image_processor.size["width"])
    grids = [get_optimal_tiled_canvas((image.height, image.width), size, image_processor.min_patches,
                                      image_processor.max_patches) for image in images]
    rows = [r if c * r > 1 else 0 for c, r in grids]
    cols = [c if c * r > 1 else 0 for c, r in grids]
    tags = tiles_layout(rows, cols, processor.image_seq_length)
    ids = inputs["input_ids"][0]
    assert len(tags) == int((ids == processor.image_token_id).sum())
    assert int((ids == processor.start_image_token_id).sum()) == int((ids == processor.end_image_token_id).sum()) == len(images)
    with torch.no_grad():
        features = torch.cat(list(model.get_image_features(inputs["pixel_values"]).pooler_output))
        whole = processor.image_processor(images, crop_to_patches=False, return_tensors="pt")["pixel_values"]
        thumbnails = model.get_image_features(whole).pooler_output
    for image in range(len(images)):
        is_overview = torch.tensor([tag[0] == image and tag[1] == "global" for tag in tags])
        torch.testing.assert_close(features[is_overview], thumbnails[image], atol=1e-5, rtol=0)
    return tags


def check_row_breaks_layout(family, inputs, images):
    """Mistral 3: per image, rows of merged patches (image_sizes / (patch x merge)), each row of
    [IMG] tokens followed by [IMG_BREAK], the last by [IMG_END]; the features are the model's own,
    one per [IMG], in order."""
    processor, model = family.processor, family.model.model
    step = processor.patch_size * processor.spatial_merge_size
    tags, expected = [], []
    for image, (height, width) in enumerate(inputs["image_sizes"].tolist()):
        rows, cols = height // step, width // step
        tags += [(image, "image", row, col) for row in range(rows) for col in range(cols)]
        for row in range(rows):
            expected += [processor.image_token_id] * cols
            expected.append(processor.image_end_token_id if row == rows - 1 else processor.image_break_token_id)
    ids = inputs["input_ids"][0].tolist()
    markers = {processor.image_token_id, processor.image_break_token_id, processor.image_end_token_id}
    assert [t for t in ids if t in markers] == expected
    with torch.no_grad():
        features = model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    assert sum(f.shape[0] for f in features) == len(tags)
    return tags


def check_soft_tokens_layout(family, inputs, images):
    """Gemma 3: per image `<start_of_image>`, mm_tokens_per_image soft tokens (a square, row-major),
    `<end_of_image>`; token_type_ids mark exactly the soft tokens (what the bidirectional mask reads)."""
    config = family.model.config
    side = math.isqrt(config.mm_tokens_per_image)
    tags = [(image, "image", k // side, k % side) for image in range(len(images)) for k in range(side * side)]
    ids = inputs["input_ids"][0]
    soft = ids == config.image_token_id
    assert int(soft.sum()) == len(tags)
    assert int((ids == config.boi_token_id).sum()) == int((ids == config.eoi_token_id).sum()) == len(images)
    assert torch.equal(inputs["token_type_ids"][0].bool(), soft)
    with torch.no_grad():
        features = family.model.model.get_image_features(inputs["pixel_values"]).pooler_output
    assert tuple(features.shape[:2]) == (len(images), side * side)
    return tags
