"""The forward in progress: which tokens it carries, and how far each layer got with them.

A token's identity in the cache is its index in feed order (the first token fed is 0), unique
and increasing; the rotary position the model gives it is the model's business and never
reaches the cache. At prefill a layer may receive fewer rows than were fed (index
broadcasting pruned the others between layers), so every layer remembers which of the
forward's tokens it holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hae_cli.cache.policies import Rows

PER_HEAD_ROWS = "per-head"  # a layer whose rows of this forward differ per head


@dataclass
class ForwardTokens:
    """The tokens of the forward in progress and how far they got."""

    index: torch.Tensor  # [q] int64: each token's index in feed order
    modality: torch.Tensor  # [q] int8
    image_id: torch.Tensor  # [q] int16
    overview: torch.Tensor  # [q] bool: an image's global-view features (prefill decisions only)
    explicit: bool  # announced by begin_tokens (the caller will call end_step)
    compresses: bool = False  # policies take prefill decisions on it (the prompt, or a later forward of images)
    probe: bool = False  # a new turn's question, fed to be scored and taken back (`end_probe`)
    rows: torch.Tensor | None = None  # forward tokens the next layer receives (None: all)
    layer_rows: dict = field(default_factory=dict)  # layer -> forward tokens it holds (None: all)
    observations: dict = field(default_factory=dict)  # layer -> {name: AttentionSummary}
    decided: set = field(default_factory=set)  # layers whose prefill decision was taken
    reserve_kept: torch.Tensor | None = None  # a decision to reserve (not delete) what it drops ...
    reserve_from: int = 0  # ... still to apply to the layers from this one on, once they have run
    questions: dict = field(default_factory=dict)  # probe: layer -> QuestionAttention

    @property
    def count(self) -> int:
        return self.index.numel()

    def tokens(self, rows: torch.Tensor | None) -> torch.Tensor:
        """The forward's token numbers (0..count-1) that `rows` stands for."""
        return torch.arange(self.count, device=self.index.device) if rows is None else rows

    def to(self, device: torch.device) -> None:
        """Move the tags next to the K/V once, rather than at every layer."""
        self.index, self.modality = self.index.to(device), self.modality.to(device)
        self.image_id, self.overview = self.image_id.to(device), self.overview.to(device)
        self.rows = None if self.rows is None else self.rows.to(device)

    def tags(self, rows: torch.Tensor | None):
        """What a layer stores per row: token index, modality, image id."""
        if rows is None:
            return self.index, self.modality, self.image_id
        return self.index[rows], self.modality[rows], self.image_id[rows]

    def cache_kwargs(self, rows: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The tags of `rows` as a layer's `update` takes them."""
        return dict(zip(("token_index", "modality", "image_id"), self.tags(rows)))

    def shared_rows(self, layer_idx: int) -> torch.Tensor | None:
        """The forward tokens a layer holds, the same in every head."""
        rows = self.layer_rows.get(layer_idx, self.rows)
        if isinstance(rows, str):
            raise RuntimeError(f"layer {layer_idx} was compacted per head; its rows are not shared")
        return rows

    def policy_rows(self, layer_idx: int, held: int, tokens_fed: int, num_layers: int) -> Rows:
        """What a policy sees of this forward at a layer holding `held` rows."""
        rows = self.shared_rows(layer_idx)
        index, modality, image_id = self.tags(rows)
        overview = self.overview if rows is None else self.overview[rows]
        return Rows(index, modality, image_id, held - index.numel(), tokens_fed, num_layers, overview)


def new_forward(count: int, tokens_fed: int, modality, image_id, overview, explicit: bool,
                default_modality: int, compresses: bool = False) -> ForwardTokens:
    """The next `count` tokens, indexed from `tokens_fed` on, with their tags (missing ones:
    `default_modality`, no image, not an overview); `compresses`: a prefill."""
    index = torch.arange(tokens_fed, tokens_fed + count)
    if modality is None:
        modality = torch.full((count,), int(default_modality), dtype=torch.int8)
    if image_id is None:
        image_id = torch.zeros(count, dtype=torch.int16)
    if overview is None:
        overview = torch.zeros(count, dtype=torch.bool)
    modality = modality.reshape(-1).to(torch.int8)
    image_id = image_id.reshape(-1).to(torch.int16)
    overview = overview.reshape(-1).to(torch.bool)
    if modality.numel() != count or image_id.numel() != count or overview.numel() != count:
        raise ValueError(
            f"begin_tokens: {count} tokens but {modality.numel()} modality / {image_id.numel()} image / "
            f"{overview.numel()} overview tags"
        )
    return ForwardTokens(index, modality, image_id, overview, explicit, compresses)
