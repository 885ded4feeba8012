"""One layer of the evicting cache: the storage of K/V and everything that travels with each row.

As transformers' `CacheLayerMixin` layers do, a layer only stores and grows: keys, values,
token indices, modality tags, image ids and running scores are owned together and only ever
changed together (append, take, compact), so they cannot drift apart. What leaves the
attention path (the recycle bin, the conversation reserve) and the queries waiting for the
fold lie beside it (`aside.py`); the moves between them live where they are decided
(`rounds.py`, `reserve.py`, `window.py`). A token's index is its place in feed order (unique;
the rotary position is the model's business and is not stored). Rows are kept in ascending
index order in every head. Every head holds the same number of rows; which rows may differ
per head.

Storage is written in place. Each of the six lives in one preallocated tensor with room for
`capacity` rows; the public `keys`, `values`, `token_index`, `modality`, `image_id` and
`scores` are views of the `held` rows only, so attention never sees the spare room. An
append copies the new rows into the room (a `torch.cat` would read and rewrite every held
row at every step). A compaction gathers the kept rows (K/V whole, every head in one
`index_select` over the `[H * capacity, D]` view) into a temporary and copies it to the
head of the same storage: that temporary, at most the rows kept, lives during the round
only. A compaction that would leave the storage larger than needed moves the rows into
smaller storage instead (the same copy, and the rest is released), so a prefill decision
frees the pruned rows' memory at once.

Once the prompt is in, the cache sets `row_bound`, the most rows a layer holds between two
rounds (budget + buffer): the storage is then exactly that big, the prompt-size storage is
released, and a later forward that needs more (several tokens at once) grows it for as long
as it needs, until the next round shrinks it back. A layer without a budget gets room for
an eighth more rows (at least 64) once the prompt is in, and again whenever it is full, so
copies are amortised: a row is copied about nine times over a long run, where `cat` copied
every held row at every step.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from hae_cli.cache.indices import complement, same_in_every_head
from hae_cli.cache.recycle_bin import TokenRows

# The row dimension of each stored tensor: `[1, H, N, D]` K/V, `[H, N]` tags and scores.
_ROW_DIM = {"keys": 2, "values": 2, "token_index": 1, "modality": 1, "image_id": 1, "scores": 1}
GROWTH_ROWS = 64  # the least a layer without a bound grows by
GROWTH_SHARE = 0.125  # ... or this share of the rows it needs, if more


class _HeldRows:
    """A layer attribute that reads as the held rows of its storage (a view, never the spare
    room; strided while there is spare room, so `.reshape` it, not `.view`). Assigning a tensor
    of that shape writes the held rows in place."""

    def __set_name__(self, owner, name: str) -> None:
        self.name, self.dim = name, _ROW_DIM[name]

    def __get__(self, layer, owner=None):
        if layer is None:
            return self
        storage = layer.__dict__.get("_storage", {}).get(self.name)
        return None if storage is None else storage.narrow(self.dim, 0, layer._held)

    def __set__(self, layer, value) -> None:
        if value is None:  # CacheLayerMixin.__init__ clears keys and values
            layer.__dict__.get("_storage", {}).pop(self.name, None)
            return
        held = self.__get__(layer)
        if held is None or held.shape != value.shape:
            raise ValueError(f"{self.name}: {tuple(value.shape)} given, the layer holds {None if held is None else tuple(held.shape)}")
        if value.data_ptr() != held.data_ptr():
            held.copy_(value)


class EvictingLayer(CacheLayerMixin):
    """One layer's rows in preallocated storage: append, take, compact (with rows merged in),
    and storage sized to the rows it must hold."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    keys = _HeldRows()  # [1, H_kv, N, D]
    values = _HeldRows()  # [1, H_kv, N, D_v]
    token_index = _HeldRows()  # [H_kv, N] int64: each token's index in feed order
    modality = _HeldRows()  # [H_kv, N] int8
    image_id = _HeldRows()  # [H_kv, N] int16
    scores = _HeldRows()  # [H_kv, N] float32

    def __init__(self, layer_idx: int = 0, **kwargs) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self._storage: dict[str, torch.Tensor] = {}  # the six tensors, `capacity` rows each
        self._held = 0
        self.row_bound: int | None = None  # the most rows held between rounds (budget + buffer)
        # the limits the cache sets, which bound what the storage must hold (`limit_rows`)
        self.budget: int | None = None  # decode budget B, set when the prompt is done
        self.window: int | None = None  # a sliding layer sees only the last `window` tokens

    # --- transformers' CacheLayerMixin ---

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        heads = key_states.shape[1]
        self._storage = {
            "keys": key_states.new_empty(1, heads, 0, key_states.shape[-1]),
            "values": value_states.new_empty(1, heads, 0, value_states.shape[-1]),
            "token_index": torch.empty(heads, 0, dtype=torch.int64, device=self.device),
            "modality": torch.empty(heads, 0, dtype=torch.int8, device=self.device),
            "image_id": torch.empty(heads, 0, dtype=torch.int16, device=self.device),
            "scores": torch.empty(heads, 0, dtype=torch.float32, device=self.device),
        }
        self._held = 0
        self.is_initialized = True

    def update(self, key_states, value_states, cache_kwargs: dict | None = None):
        """Append, with each row's tags from `cache_kwargs` (`token_index`, `modality`, `image_id`,
        as the cache gives them); without tags the rows continue after the last held index, tagged
        text. Returns all held K/V (views)."""
        tags = cache_kwargs or {}
        token_index, modality, image_id = tags.get("token_index"), tags.get("modality"), tags.get("image_id")
        q = key_states.shape[2]
        if token_index is None:
            start = int(self.token_index.max()) + 1 if self.get_seq_length() else 0
            token_index = torch.arange(start, start + q, device=key_states.device)
        if modality is None:
            modality = torch.zeros(q, dtype=torch.int8)
        if image_id is None:
            image_id = torch.zeros(q, dtype=torch.int16)
        return self.append(key_states, value_states, token_index, modality, image_id)

    def get_seq_length(self) -> int:
        return self._held

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
        return self._held

    @property
    def capacity(self) -> int:
        """Rows per head the storage has room for."""
        return self._storage["keys"].shape[2] if self._storage else 0

    @property
    def bytes_per_token(self) -> int:
        """K+V bytes of one row in every head."""
        if not self._storage:
            return 0
        keys, values = self._storage["keys"], self._storage["values"]
        return keys.shape[1] * (keys.shape[3] * keys.element_size() + values.shape[3] * values.element_size())

    @property
    def bytes_held(self) -> int:
        """K+V bytes of the held rows: held x `bytes_per_token`."""
        return self._held * self.bytes_per_token

    @property
    def bytes_allocated(self) -> int:
        """K+V bytes of the storage (held rows and spare room), measured from the tensors."""
        if not self._storage:
            return 0
        return self._storage["keys"].untyped_storage().nbytes() + self._storage["values"].untyped_storage().nbytes()

    def held_index(self) -> torch.Tensor:
        """`[1 or H_kv, held]`: the index of each row held (one row where every head holds the
        same tokens)."""
        if self.token_index is None:
            return torch.empty(1, 0, dtype=torch.int64)
        return self.token_index[:1] if same_in_every_head(self.token_index) else self.token_index

    def limit_rows(self, bound: int | None) -> None:
        """Once the prompt is in: size the storage to `bound` rows (None: the rows held and room
        to grow, so the first decode step does not copy the prompt), releasing the prompt-size
        storage; later compactions shrink it back to `bound`."""
        self.row_bound = bound
        target = max(self._held, bound) if bound is not None else _with_room(self._held)
        if self._storage and self.capacity != target:
            self._resize(target)

    def append(self, key_states, value_states, token_index, modality, image_id):
        """Add `q` rows (`[1, H, q, D]`) with their tags (`[q]` each). Returns all held K/V (views)."""
        if key_states.shape[0] != 1:
            raise ValueError("EvictingCache holds one sequence (batch size 1)")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        heads, q = key_states.shape[1], key_states.shape[2]
        device = self.device

        def tags(tensor, dtype):
            return tensor.to(device=device, dtype=dtype).reshape(1, q).expand(heads, q)

        rows = self._held + q
        if rows > self.capacity:
            self._resize(self._grown(rows))
        # copied into the storage: never a view of the projection output (it would pin q, k and v)
        self._write(self._held, {
            "keys": key_states,
            "values": value_states,
            "token_index": tags(token_index, torch.int64),
            "modality": tags(modality, torch.int8),
            "image_id": tags(image_id, torch.int16),
            "scores": torch.zeros((), dtype=torch.float32, device=device).expand(heads, q),
        })
        self._held = rows
        return self.keys, self.values

    def take(self, index: torch.Tensor) -> TokenRows:
        """Copies of rows `index` (`[n]` for every head, or `[H, n]` per head)."""
        index = index.to(self.device)
        return TokenRows(**{name: _select(stored, index, _ROW_DIM[name]) for name, stored in self._storage.items()})

    def compact(self, keep: torch.Tensor, incoming: TokenRows | None = None) -> None:
        """Keep only rows `keep`, ascending: `[N']` (same rows in every head) or `[H, N']`, and merge
        `incoming` rows in (index order). The rows are gathered once and written back in place."""
        if incoming is None or len(incoming) == 0:
            self._hold(self.take(keep))
            return
        keep = keep.to(self.device)
        new_index = incoming.token_index.to(self.device)
        # One merge plan for every head when they all hold the same rows (always so with a bin).
        shared = keep.dim() == 1 and same_in_every_head(self.token_index) and same_in_every_head(new_index)
        planned = 1 if shared else self.token_index.shape[0]
        plan_keep = keep.expand(planned, -1) if keep.dim() == 1 else keep
        source, slots = _merge_plan(self.token_index[:planned].gather(1, plan_keep), plan_keep, new_index[:planned])
        if shared:
            source, slots = source[0], slots[0]

        def merged(name: str, new: torch.Tensor) -> torch.Tensor:
            stored, dim = self._storage[name], _ROW_DIM[name]
            return _place(_select(stored, source, dim), slots, new.to(self.device, stored.dtype), dim)

        self._hold(TokenRows(**{name: merged(name, getattr(incoming, name)) for name in _ROW_DIM}))

    def insert(self, rows: TokenRows) -> None:
        """Merge rows in, keeping every head in ascending index order."""
        if len(rows) == 0:
            return
        self.compact(torch.arange(self.held, device=self.device), rows)

    def make_room(self, rows: int) -> None:
        """Storage for at least `rows` rows now, so that steps up to there never resize it (a
        compiled step needs its shapes fixed)."""
        if self._storage and rows > self.capacity:
            self._resize(rows)

    # --- the storage ---

    def _hold(self, rows: TokenRows) -> None:
        """Make `rows` (copies, not views of the storage) the held rows, at the head of the storage.
        Storage larger than needed goes: down to the bound, or (before the prompt is done, when a
        prefill decision prunes a layer) to exactly these rows, so pruning frees memory at once."""
        count = len(rows)
        needed = count if self.row_bound is None else max(self.row_bound, count)
        self._held = 0  # nothing to carry over if the storage is resized
        if count > self.capacity:
            self._resize(self._grown(count))
        elif self.capacity > needed:
            self._resize(needed)
        self._write(0, {name: getattr(rows, name) for name in _ROW_DIM})
        self._held = count

    def _grown(self, rows: int) -> int:
        """The capacity to give a layer that must hold `rows` rows it has no room for."""
        if self.row_bound is not None:
            return max(rows, self.row_bound)  # past the bound: only for as long as a forward needs
        if not self.capacity:
            return rows  # the prompt: exactly its rows
        return _with_room(rows)

    def _resize(self, capacity: int) -> None:
        """Move the held rows into new storage of `capacity` rows; the old storage is released."""
        old = self._storage
        # zeros, not garbage: a compiled step attends over the spare rows too (masked), and a
        # masked NaN in a value row would still poison the output (0 x NaN)
        self._storage = {
            name: stored.new_zeros(stored.shape[: _ROW_DIM[name]] + (capacity,) + stored.shape[_ROW_DIM[name] + 1 :])
            for name, stored in old.items()
        }
        self._write(0, {name: stored.narrow(_ROW_DIM[name], 0, self._held) for name, stored in old.items()})

    def _write(self, start: int, rows: dict[str, torch.Tensor]) -> None:
        """Copy `rows` into the storage from row `start` on."""
        for name, part in rows.items():
            dim = _ROW_DIM[name]
            self._storage[name].narrow(dim, start, part.shape[dim]).copy_(part)


def _with_room(rows: int) -> int:
    """The capacity a layer without a bound gets for `rows` rows: an eighth more, at least 64."""
    return rows + max(GROWTH_ROWS, int(GROWTH_SHARE * rows))


def _select(tensor: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """Copies of rows `index` (`[n]` for every head, or `[H, n]` per head) of `[H, N]` tags (dim 1)
    or of `[1, H, N, D]` K/V (dim 2), contiguous K/V (a layer's storage: N is its capacity).
    K/V rows are copied whole, every head in one `index_select`."""
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


def _merge_plan(kept_index: torch.Tensor, keep: torch.Tensor, new_index: torch.Tensor):
    """Where rows go when rows `keep` (`[R, k]`, at `kept_index`, ascending) meet new rows at
    `new_index` (`[R, r]`, any order) in index order. Returns (`[R, k + r]` the held row each
    output row copies, a placeholder 0 where a new row lands; `[R, r]` where each new row lands)."""
    arriving = new_index.shape[1]
    ordered, by_index = new_index.sort(dim=1)
    # a new row lands after the kept rows and the new rows of lower index
    landing = torch.searchsorted(kept_index, ordered) + torch.arange(arriving, device=keep.device)
    slots = torch.empty_like(landing).scatter_(1, by_index, landing)
    stays = complement(slots, keep.shape[1] + arriving)
    return keep.new_zeros(stays.shape[0], keep.shape[1] + arriving).scatter_(1, stays, keep), slots


def _flat_rows(index: torch.Tensor, n: int) -> torch.Tensor:
    """`[H, m]` row indices per head -> indices into the `[H * n, D]` view of a `[1, H, n, D]` tensor."""
    return (index + n * torch.arange(index.shape[0], device=index.device)[:, None]).reshape(-1)

