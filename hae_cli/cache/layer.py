"""One layer of the evicting cache: K/V and everything that must travel with each row.

Keys, values, positions, modality tags, image ids and running scores are owned together
and only ever changed together (append, compact, bin, restore), so they cannot drift
apart. Rows are kept in ascending position order in every head. Compaction builds new
tensors (`index_select` / `gather`): the old storage is released, memory is freed, not
masked. Every head holds the same number of rows; which rows may differ per head.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from hae_cli.cache.recycle_bin import RecycleBin, TokenRows


class EvictingLayer(CacheLayerMixin):
    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, layer_idx: int = 0, **kwargs) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.positions: torch.Tensor | None = None  # [H_kv, N] int64
        self.modality: torch.Tensor | None = None  # [H_kv, N] int8
        self.image_id: torch.Tensor | None = None  # [H_kv, N] int16
        self.scores: torch.Tensor | None = None  # [H_kv, N] float32
        self.budget: int | None = None  # decode budget B, set when the prompt is done
        self.bin = RecycleBin()
        self.stashed_queries: torch.Tensor | None = None  # [H_q, t, D] post-RoPE, not yet in the scores
        self.stashed_positions: torch.Tensor | None = None  # [t]
        self.attention_scaling: float | None = None

    # --- transformers' CacheLayerMixin ---

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        heads = key_states.shape[1]
        self.keys = key_states[:, :, :0].contiguous()
        self.values = value_states[:, :, :0].contiguous()
        self.positions = torch.empty(heads, 0, dtype=torch.int64, device=self.device)
        self.modality = torch.empty(heads, 0, dtype=torch.int8, device=self.device)
        self.image_id = torch.empty(heads, 0, dtype=torch.int16, device=self.device)
        self.scores = torch.empty(heads, 0, dtype=torch.float32, device=self.device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, positions=None, modality=None, image_id=None, **kwargs):
        """Append; without tags the rows continue after the last held position, tagged text."""
        q = key_states.shape[2]
        if positions is None:
            start = int(self.positions.max()) + 1 if self.get_seq_length() else 0
            positions = torch.arange(start, start + q, device=key_states.device)
        if modality is None:
            modality = torch.zeros(q, dtype=torch.int8)
        if image_id is None:
            image_id = torch.zeros(q, dtype=torch.int16)
        return self.append(key_states, value_states, positions, modality, image_id)

    def get_seq_length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__(self.layer_idx)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("an evicting cache cannot be rolled back (no assisted/speculative decoding)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._single_sequence(beam_idx.numel())

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._single_sequence(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._single_sequence(indices.numel())

    @staticmethod
    def _single_sequence(count: int) -> None:
        if count != 1:
            raise NotImplementedError("EvictingCache holds one sequence (batch size 1, no beam search)")

    # --- our operations ---

    @property
    def held(self) -> int:
        """Rows per head."""
        return self.get_seq_length()

    @property
    def kv_bytes(self) -> int:
        """K+V bytes, measured from the tensors' storage."""
        if self.keys is None:
            return 0
        return self.keys.untyped_storage().nbytes() + self.values.untyped_storage().nbytes()

    def append(self, key_states, value_states, positions, modality, image_id):
        """Add `q` rows (`[1, H, q, D]`) with their tags (`[q]` each). Returns all held K/V."""
        if key_states.shape[0] != 1:
            raise ValueError("EvictingCache holds one sequence (batch size 1)")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        heads, q = key_states.shape[1], key_states.shape[2]
        device = self.device

        def tags(tensor, dtype):
            return tensor.to(device=device, dtype=dtype).reshape(1, q).expand(heads, q)

        # cat always copies: never keep a view of the projection output (it would pin q, k and v)
        self.keys = torch.cat([self.keys, key_states], dim=2)
        self.values = torch.cat([self.values, value_states], dim=2)
        self.positions = torch.cat([self.positions, tags(positions, torch.int64)], dim=1)
        self.modality = torch.cat([self.modality, tags(modality, torch.int8)], dim=1)
        self.image_id = torch.cat([self.image_id, tags(image_id, torch.int16)], dim=1)
        self.scores = torch.cat([self.scores, self.scores.new_zeros(heads, q)], dim=1)
        return self.keys, self.values

    def take(self, index: torch.Tensor) -> TokenRows:
        """Copies of rows `index` (`[n]` for every head, or `[H, n]` per head)."""
        index = index.to(self.device)
        return TokenRows(
            keys=_select(self.keys, index, dim=2),
            values=_select(self.values, index, dim=2),
            positions=_select(self.positions, index, dim=1),
            modality=_select(self.modality, index, dim=1),
            image_id=_select(self.image_id, index, dim=1),
            scores=_select(self.scores, index, dim=1),
        )

    def compact(self, keep: torch.Tensor) -> None:
        """Keep only rows `keep`, ascending: `[N']` (same rows in every head) or `[H, N']`."""
        rows = self.take(keep)
        self.keys, self.values = rows.keys, rows.values
        self.positions, self.modality, self.image_id = rows.positions, rows.modality, rows.image_id
        self.scores = rows.scores

    def evict_to_bin(self, index: torch.Tensor) -> TokenRows:
        """Move rows `index` (`[n]`, the same in every head) to the recycle bin; returns them."""
        rows = self.take(index)
        self.compact(complement(index.to(self.device), self.held))
        self.bin.add(rows)
        return rows

    def restore(self, bin_index: torch.Tensor) -> TokenRows:
        """Put bin tokens `bin_index` back, at their original positions; returns them."""
        rows = self.bin.take(bin_index, self.device)
        self.insert(rows)
        return rows

    def insert(self, rows: TokenRows) -> None:
        """Merge rows in, keeping every head in ascending position order."""
        if len(rows) == 0:
            return
        positions = torch.cat([self.positions, rows.positions], dim=1)
        order = positions.argsort(dim=1)
        self.keys = _select(torch.cat([self.keys, rows.keys.to(self.dtype)], dim=2), order, dim=2)
        self.values = _select(torch.cat([self.values, rows.values.to(self.dtype)], dim=2), order, dim=2)
        self.positions = positions.gather(1, order)
        self.modality = torch.cat([self.modality, rows.modality], dim=1).gather(1, order)
        self.image_id = torch.cat([self.image_id, rows.image_id], dim=1).gather(1, order)
        self.scores = torch.cat([self.scores, rows.scores.float()], dim=1).gather(1, order)

    def stash_queries(self, queries: torch.Tensor, positions: torch.Tensor) -> None:
        """Keep decode queries (`[H_q, q, D]`, post-RoPE, at `positions` `[q]`) until they are folded
        into the running scores."""
        if self.stashed_queries is None:
            self.stashed_queries, self.stashed_positions = queries, positions
        else:
            self.stashed_queries = torch.cat([self.stashed_queries, queries], dim=1)
            self.stashed_positions = torch.cat([self.stashed_positions, positions])

    @property
    def stashed(self) -> int:
        return 0 if self.stashed_positions is None else self.stashed_positions.numel()

    def take_stash(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        stash = self.stashed_queries, self.stashed_positions
        self.stashed_queries = self.stashed_positions = None
        return stash

def _select(tensor: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """`index_select` for a shared `[n]` index, `gather` for a per-head `[H, n]` one (dim 1 = heads' rows)."""
    if index.dim() == 1:
        return tensor.index_select(dim, index)
    if dim == 1:  # [H, N] tags
        return tensor.gather(1, index)
    shape = (1, index.shape[0], index.shape[1], tensor.shape[-1])
    return tensor.gather(2, index[None, :, :, None].expand(shape))


def complement(index: torch.Tensor, size: int) -> torch.Tensor:
    """Rows of `range(size)` not in `index` (distinct rows; `[n]` -> `[size - n]`, `[H, n]` ->
    `[H, size - n]`), ascending. The result size is known, so no device sync."""
    if index.dim() == 1:
        keep = torch.ones(size, dtype=torch.bool, device=index.device)
        keep[index] = False
        return torch.nonzero_static(keep, size=size - index.numel()).squeeze(-1)
    heads, kept = index.shape[0], size - index.shape[1]
    keep = torch.ones(heads, size, dtype=torch.bool, device=index.device)
    keep.scatter_(1, index, False)
    return torch.nonzero_static(keep, size=heads * kept)[:, 1].reshape(heads, kept)
