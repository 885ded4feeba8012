"""What a checkpoint was built for, so that a request it was not built for is refused (or, for
the answer's length, capped with a note) instead of answered wrong in silence.

Three limits: crops per image (`--num-crops`, where a family has crops), images per prompt,
and the context: the most tokens, prompt and answer together, the model attends over as it
was trained. Each family reads its own from its checkpoint (`phi3v/limits.py`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

from hae_cli.errors import ConfigError, InputError


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
