"""The recycle bin: a layer's evicted tokens, off the attention path, until restored or deleted.

An HAE eviction round moves a token here instead of deleting it (the paper's OS-style bin,
arXiv 2602.02197): it is never attended, and a later round may put it back, with its
original index and modality, if the recent queries want it again. On CUDA the bin lives
in pinned host memory, so eviction really frees device memory and restoring is one async
copy. Tokens in the bin are the same in every head (only policies that choose per token,
not per head, use a bin), so their tags are kept once, their K/V and scores per head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenRows:
    """Tokens lifted out of a layer, with everything that travels with them."""

    keys: torch.Tensor  # [1, H_kv, n, D]
    values: torch.Tensor  # [1, H_kv, n, D_v]
    token_index: torch.Tensor  # [H_kv, n] int64: each token's index in feed order
    modality: torch.Tensor  # [H_kv, n] int8
    image_id: torch.Tensor  # [H_kv, n] int16
    scores: torch.Tensor  # [H_kv, n] float32: running scores

    def __len__(self) -> int:
        return self.keys.shape[2]

    @staticmethod
    def cat(parts: list["TokenRows"]) -> "TokenRows":
        """Rows of several takes as one (on the first part's device)."""
        parts = [part for part in parts if len(part)] or parts[:1]
        if len(parts) == 1:
            return parts[0]
        device = parts[0].keys.device
        return TokenRows(**{
            name: torch.cat([getattr(part, name).to(device) for part in parts], dim=2 if name in ("keys", "values") else 1)
            for name in ("keys", "values", "token_index", "modality", "image_id", "scores")
        })


class RecycleBin:
    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None  # [1, H_kv, M, D], on the host
        self.values: torch.Tensor | None = None
        self.token_index = torch.empty(0, dtype=torch.int64)  # [M]
        self.modality = torch.empty(0, dtype=torch.int8)  # [M]
        self.image_id = torch.empty(0, dtype=torch.int16)  # [M]
        self.scores: torch.Tensor | None = None  # [H_kv, M] float32
        self.rounds = torch.empty(0, dtype=torch.int32)  # [M]: eviction rounds survived in the bin
        self.pinned = False

    def __len__(self) -> int:
        return self.token_index.numel()

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.untyped_storage().nbytes() + self.values.untyped_storage().nbytes()

    def add(self, rows: TokenRows) -> None:
        """Put evicted tokens in (they start with 0 rounds)."""
        if len(rows) == 0:
            return
        self.pinned = rows.keys.is_cuda and torch.cuda.is_available()
        if self.keys is None:
            empty = rows.keys[:, :, :0].cpu()
            self.keys, self.values = empty, rows.values[:, :, :0].cpu()
            self.scores = rows.scores[:, :0].cpu()
        self.keys = self._host_cat([self.keys, rows.keys], dim=2)
        self.values = self._host_cat([self.values, rows.values], dim=2)
        self.scores = self._host_cat([self.scores, rows.scores.float()], dim=1)
        self.token_index = torch.cat([self.token_index, rows.token_index[0].cpu()])
        self.modality = torch.cat([self.modality, rows.modality[0].cpu()])
        self.image_id = torch.cat([self.image_id, rows.image_id[0].cpu()])
        self.rounds = torch.cat([self.rounds, torch.zeros(len(rows), dtype=torch.int32)])

    def take(self, index: torch.Tensor, device: torch.device) -> TokenRows:
        """Remove tokens `index` (`[m]`) from the bin and return them on `device`."""
        index = index.cpu()
        heads = self.keys.shape[1]
        rows = TokenRows(
            keys=self.keys.index_select(2, index).to(device, non_blocking=True),
            values=self.values.index_select(2, index).to(device, non_blocking=True),
            token_index=self.token_index[index].to(device).expand(heads, -1).contiguous(),
            modality=self.modality[index].to(device).expand(heads, -1).contiguous(),
            image_id=self.image_id[index].to(device).expand(heads, -1).contiguous(),
            scores=self.scores[:, index].to(device),
        )
        self._keep(_complement(index, len(self)))
        return rows

    def delete(self, index: torch.Tensor) -> torch.Tensor:
        """Delete tokens `index` for good; returns their modality tags."""
        index = index.cpu()
        deleted = self.modality[index]
        self._keep(_complement(index, len(self)))
        return deleted

    def age(self) -> None:
        self.rounds += 1

    def _keep(self, keep: torch.Tensor) -> None:
        self.keys = self._host_index(self.keys, keep, dim=2)
        self.values = self._host_index(self.values, keep, dim=2)
        self.scores = self.scores[:, keep]
        self.token_index, self.modality = self.token_index[keep], self.modality[keep]
        self.image_id, self.rounds = self.image_id[keep], self.rounds[keep]

    def _host_cat(self, parts: list[torch.Tensor], dim: int) -> torch.Tensor:
        parts = [p.cpu() for p in parts]
        shape = list(parts[0].shape)
        shape[dim] = sum(p.shape[dim] for p in parts)
        out = torch.empty(shape, dtype=parts[0].dtype, pin_memory=self.pinned)
        return torch.cat(parts, dim=dim, out=out)

    def _host_index(self, tensor: torch.Tensor, keep: torch.Tensor, dim: int) -> torch.Tensor:
        shape = list(tensor.shape)
        shape[dim] = keep.numel()
        out = torch.empty(shape, dtype=tensor.dtype, pin_memory=self.pinned)
        return torch.index_select(tensor, dim, keep, out=out)


def _complement(index: torch.Tensor, size: int) -> torch.Tensor:
    keep = torch.ones(size, dtype=torch.bool)
    keep[index] = False
    return keep.nonzero().squeeze(-1)
