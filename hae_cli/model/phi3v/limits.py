"""Phi-3.5-Vision's limits, and the shipped demo model's.

Phi-3.5-Vision was trained with up to 16 crops per image (its model card advises 16 for one
image, 4 for several) and a 128K context. The shipped demo model was trained on much less, read
from `scripts/train_demo_model.py`: every image as 1 crop (`NUM_CROPS`), stories of 2-8 images
(`STORY_SIZES`), and sequences under 2,700 tokens, inside LongRoPE's original 4,096 positions;
past those, every position is rotated by the long factors, which the demo model never saw.
"""

from __future__ import annotations

from hae_cli.model.limits import ModelLimits

PHI35V_MAX_CROPS = 16
DEMO_MODEL_CROPS = 1  # scripts/train_demo_model.py: NUM_CROPS
DEMO_MODEL_MAX_IMAGES = 8  # scripts/train_demo_model.py: max(STORY_SIZES)
SCENES_MODEL_CROPS = 4  # scripts/train_scenes_model.py: NUM_CROPS
SCENES_MODEL_MAX_IMAGES = 4  # its chats and stories: 2-4 images


def demo_model_limits(original_positions: int) -> ModelLimits:
    return shipped_model_limits("the demo model", DEMO_MODEL_CROPS, DEMO_MODEL_MAX_IMAGES, original_positions)


def shipped_model_limits(name: str, crops: int, images: int, original_positions: int) -> ModelLimits:
    """A shipped model's limits: what its trainer gave it, inside LongRoPE's original positions."""
    return ModelLimits(
        name=name,
        max_crops=crops,
        max_images=images,
        context_tokens=original_positions,
        context_reason="the LongRoPE positions it was trained inside",
    )


def checkpoint_limits(max_positions: int, file_crops: int) -> ModelLimits:
    return ModelLimits(
        name="this checkpoint",
        max_crops=max(PHI35V_MAX_CROPS, file_crops),
        max_images=None,
        context_tokens=max_positions,
        context_reason="its max_position_embeddings",
    )
