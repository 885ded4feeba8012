"""What a checkpoint was built for, so that a request it was not built for is refused (or, for
the answer's length, capped with a note) instead of answered wrong in silence.

Three limits: crops per image (`--num-crops`), images per prompt, and the context: the most
tokens, prompt and answer together, the model attends over as it was trained.

Phi-3.5-Vision was trained with up to 16 crops per image (its model card advises 16 for one
image, 4 for several) and a 128K context. The shipped demo model was trained on much less, read
from `scripts/train_demo_model.py`: every image as 1 crop (`NUM_CROPS`), stories of 2-8 images
(`STORY_SIZES`), and sequences under 2,700 tokens, inside LongRoPE's original 4,096 positions;
past those, every position is rotated by the long factors, which the demo model never saw.
"""

from __future__ import annotations

from dataclasses import dataclass

from hae_cli.errors import ConfigError, InputError

PHI35V_MAX_CROPS = 16
DEMO_MODEL_CROPS = 1  # scripts/train_demo_model.py: NUM_CROPS
DEMO_MODEL_MAX_IMAGES = 8  # scripts/train_demo_model.py: max(STORY_SIZES)


@dataclass(frozen=True)
class ModelLimits:
    """`name` says whose limits these are in messages ("the demo model", "this checkpoint")."""

    name: str
    max_crops: int
    max_images: int | None  # None: not known to be limited (the context still is)
    context_tokens: int
    context_reason: str

    def check_crops(self, num_crops: int) -> None:
        if num_crops > self.max_crops:
            raise ConfigError(
                f"--num-crops {num_crops}: {self.name} was trained with at most {self.max_crops} "
                f"crop{'s' if self.max_crops != 1 else ''} per image; give {self.max_crops} or fewer"
            )

    def check_images(self, num_images: int) -> None:
        if self.max_images is not None and num_images > self.max_images:
            raise InputError(
                f"{num_images} images: {self.name} was trained on prompts of at most {self.max_images} images; "
                f"give {self.max_images} or fewer"
            )

    def check_prompt(self, prompt_tokens: int) -> None:
        """A prompt must leave room for at least one generated token."""
        if prompt_tokens >= self.context_tokens:
            raise InputError(
                f"the prompt is {prompt_tokens:,} tokens, and {self.name} attends over at most "
                f"{self.context_tokens:,} ({self.context_reason}); shorten the question or give fewer images"
            )

    def answer_room(self, prompt_tokens: int, max_new_tokens: int) -> tuple[int, str | None]:
        """(tokens that may be generated, a note if that is fewer than asked)."""
        room = self.context_tokens - prompt_tokens
        if max_new_tokens <= room:
            return max_new_tokens, None
        return room, (
            f"--max-new-tokens {max_new_tokens} capped at {room}: the prompt's {prompt_tokens:,} tokens leave "
            f"{room} of the {self.context_tokens:,} that {self.name} attends over"
        )


def demo_model_limits(original_positions: int) -> ModelLimits:
    return ModelLimits(
        name="the demo model",
        max_crops=DEMO_MODEL_CROPS,
        max_images=DEMO_MODEL_MAX_IMAGES,
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
