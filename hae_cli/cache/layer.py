"""One layer of the evicting cache: K/V and everything that must travel with each row.

Keys, values, positions, modality tags, image ids and running scores are owned together
and only ever changed together (append, compact, bin, restore), so they cannot drift
apart. Rows are kept in ascending position order in every head. Compaction builds new
tensors (`index_select` / `gather`): the old storage is released, memory is freed, not
masked. Every head holds the same number of rows; which rows may differ per head. K/V rows
are copied whole, every head in one `index_select` over the `[H * N, D]` view; a round that
also restores from the bin rebuilds each tensor once.
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
        self.stashed_queries: list[torch.Tensor] = []  # [H_q, q, D] each, post-RoPE, not yet in the scores
        self.stashed_positions: list[torch.Tensor] = []  # [q] each
        self.stashed = 0  # queries stashed
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

    def compact(self, keep: torch.Tensor, incoming: TokenRows | None = None) -> None:
        """Keep only rows `keep`, ascending: `[N']` (same rows in every head) or `[H, N']`, and merge
        `incoming` rows in (position order). Each tensor is rebuilt by one copy."""
        if incoming is None or len(incoming) == 0:
            rows = self.take(keep)
            self.keys, self.values = rows.keys, rows.values
            self.positions, self.modality, self.image_id = rows.positions, rows.modality, rows.image_id
            self.scores = rows.scores
            return
        keep = keep.to(self.device)
        new_positions = incoming.positions.to(self.device)
        # One merge plan for every head when they all hold the same rows (always so with a bin).
        shared = keep.dim() == 1 and _same_in_every_head(self.positions) and _same_in_every_head(new_positions)
        planned = 1 if shared else self.positions.shape[0]
        plan_keep = keep.expand(planned, -1) if keep.dim() == 1 else keep
        source, slots = _merge_plan(self.positions[:planned].gather(1, plan_keep), plan_keep, new_positions[:planned])
        if shared:
            source, slots = source[0], slots[0]

        def merged(held: torch.Tensor, new: torch.Tensor, dim: int) -> torch.Tensor:
            return _place(_select(held, source, dim), slots, new.to(self.device, held.dtype), dim)

        self.keys, self.values = merged(self.keys, incoming.keys, 2), merged(self.values, incoming.values, 2)
        self.positions = merged(self.positions, new_positions, 1)
        self.modality = merged(self.modality, incoming.modality, 1)
        self.image_id = merged(self.image_id, incoming.image_id, 1)
        self.scores = merged(self.scores, incoming.scores, 1)

    def evict_to_bin(self, index: torch.Tensor) -> TokenRows:
        """Move rows `index` (`[n]`, the same in every head) to the recycle bin; returns them."""
        return self.swap_with_bin(index, index[:0])[0]

    def restore(self, bin_index: torch.Tensor) -> TokenRows:
        """Put bin tokens `bin_index` back, at their original positions; returns them."""
        return self.swap_with_bin(bin_index[:0], bin_index)[1]

    def swap_with_bin(self, evict: torch.Tensor, restore: torch.Tensor) -> tuple[TokenRows, TokenRows]:
        """Move rows `evict` (`[n]`) to the bin and bin tokens `restore` (`[m]`, indices before this
        call) back, at their original positions, rebuilding the layer once. The bin then holds its
        old tokens but the restored, then the evicted. Returns (evicted, restored)."""
        evict = evict.to(self.device)
        evicted = self.take(evict)
        restored = self.bin.take(restore, self.device) if restore.numel() else self.take(evict[:0])
        if evict.numel() or restore.numel():
            self.compact(complement(evict, self.held), restored)
        self.bin.add(evicted)
        return evicted, restored

    def insert(self, rows: TokenRows) -> None:
        """Merge rows in, keeping every head in ascending position order."""
        if len(rows) == 0:
            return
        self.compact(torch.arange(self.held, device=self.device), rows)

    def stash_queries(self, queries: torch.Tensor, positions: torch.Tensor) -> None:
        """Keep decode queries (`[H_q, q, D]`, post-RoPE, at `positions` `[q]`) until they are folded
        into the running scores (joined then, not at every step)."""
        self.stashed_queries.append(queries)
        self.stashed_positions.append(positions)
        self.stashed += positions.numel()

    def take_stash(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The stashed queries `[H_q, t, D]` (oldest first) and their positions `[t]`, or Nones."""
        if not self.stashed_queries:
            return None, None
        queries, positions = self.stashed_queries, self.stashed_positions
        stash = (queries[0], positions[0]) if len(queries) == 1 else (torch.cat(queries, dim=1), torch.cat(positions))
        self.stashed_queries, self.stashed_positions, self.stashed = [], [], 0
        return stash


def _select(tensor: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """Rows `index` (`[n]` for every head, or `[H, n]` per head) of `[H, N]` tags (dim 1) or of
    `[1, H, N, D]` K/V (dim 2). K/V rows are copied whole, every head in one `index_select`."""
    if dim == 1:
        return tensor.index_select(1, index) if index.dim() == 1 else tensor.gather(1, index)
    _, heads, n, width = tensor.shape
    rows = _flat_rows(index.expand(heads, -1) if index.dim() == 1 else index, n)
    return tensor.reshape(heads * n, width).index_select(0, rows).view(1, heads, -1, width)


def _place(tensor: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor, dim: int) -> torch.Tensor:
    """Write `rows` into `tensor` (contiguous) at `slots` (`[r]` for every head, or `[H, r]`), in place:
    `[H, r]` tags into `[H, N]` (dim 1) or `[1, H, r, D]` K/V into `[1, H, N, D]` (dim 2)."""
    if dim == 1:
        return tensor.index_copy_(1, slots, rows) if slots.dim() == 1 else tensor.scatter_(1, slots, rows)
    _, heads, n, width = tensor.shape
    slots = slots.expand(heads, -1) if slots.dim() == 1 else slots
    tensor.view(heads * n, width).index_copy_(0, _flat_rows(slots, n), rows.reshape(-1, width))
    return tensor


def _merge_plan(kept_positions: torch.Tensor, keep: torch.Tensor, new_positions: torch.Tensor):
    """Where rows go when rows `keep` (`[R, k]`, at `kept_positions`, ascending) meet new rows at
    `new_positions` (`[R, r]`, any order) in position order. Returns (`[R, k + r]` the held row each
    output row copies, a placeholder 0 where a new row lands; `[R, r]` where each new row lands)."""
    arriving = new_positions.shape[1]
    ordered, by_position = new_positions.sort(dim=1)
    # a new row lands after the kept rows and the new rows at lower positions
    landing = torch.searchsorted(kept_positions, ordered) + torch.arange(arriving, device=keep.device)
    slots = torch.empty_like(landing).scatter_(1, by_position, landing)
    stays = complement(slots, keep.shape[1] + arriving)
    return keep.new_zeros(stays.shape[0], keep.shape[1] + arriving).scatter_(1, stays, keep), slots


def _same_in_every_head(positions: torch.Tensor) -> bool:
    return positions.shape[0] == 1 or bool((positions == positions[:1]).all())


def _flat_rows(index: torch.Tensor, n: int) -> torch.Tensor:
    """`[H, m]` row indices per head -> indices into the `[H * n, D]` view of a `[1, H, n, D]` tensor."""
    return (index + n * torch.arange(index.shape[0], device=index.device)[:, None]).reshape(-1)


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
