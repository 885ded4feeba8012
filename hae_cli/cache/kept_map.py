"""What the cache holds of each image, slot by slot: the data behind `--show-kept` and the
JSON's `kept`, read from the layers' token indices and their recycle bins at one moment.

A slot is one of the tokens an image takes in the prompt (its patches and separators, in the
order the model lays them out); image k's slots are contiguous, from token index `start` on. Per layer a slot is held
by some number of KV heads (all or none, unless the policy chooses per head), or sits in the
bin (bin tokens are the same in every head), or is gone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ImageSlots:
    """Image `index` (1-based) of the prompt: token indices `start .. start + count - 1`."""

    index: int
    start: int
    count: int


@dataclass(frozen=True)
class KeptMap:
    """The cache after decode step `step` (0: after prefill).

    heads_holding: per layer, per image, `[slots]` int: KV heads that hold each slot.
    in_bin: per layer, per image, `[slots]` bool: in that layer's recycle bin.
    in_reserve: likewise, set aside in its reserve for a later question.
    heads: KV heads per layer.
    """

    step: int
    images: list[ImageSlots]
    heads: int
    heads_holding: list[list[np.ndarray]]
    in_bin: list[list[np.ndarray]]
    in_reserve: list[list[np.ndarray]] | None = None

    @property
    def num_layers(self) -> int:
        return len(self.heads_holding)

    def held_share(self, layer: int, image: int) -> np.ndarray:
        """`[slots]` float in [0, 1]: the share of heads holding each slot of image `image` (1-based)."""
        return self.heads_holding[layer][image - 1] / self.heads

    def tokens_held(self, layer: int, image: int) -> int:
        """Slots of the image the layer holds (in every head, or at all for per-head policies: rows
        per head are equal in number, so this is the mean over heads, rounded)."""
        return int(round(self.heads_holding[layer][image - 1].sum() / self.heads))

    def tokens_in_bin(self, layer: int, image: int) -> int:
        return int(self.in_bin[layer][image - 1].sum())

    def reserved(self, layer: int, image: int) -> np.ndarray:
        """`[slots]` bool: set aside in the layer's reserve."""
        if self.in_reserve is None:
            return np.zeros(self.images[image - 1].count, dtype=bool)
        return self.in_reserve[layer][image - 1]

    def tokens_in_reserve(self, layer: int, image: int) -> int:
        return int(self.reserved(layer, image).sum())


def image_slots(image_id: torch.Tensor) -> list[ImageSlots]:
    """Each image's slot range from the `[L]` image ids of the tokens fed from index 0 (k on image k's
    slots, 0 elsewhere)."""
    ids = image_id.reshape(-1).cpu()
    out = []
    for k in range(1, int(ids.max()) + 1 if ids.numel() else 1):
        where = (ids == k).nonzero().reshape(-1)
        if where.numel():
            out.append(ImageSlots(k, int(where[0]), int(where.numel())))
    return out


def kept_map(cache, images: list[ImageSlots], step: int) -> KeptMap:
    """Read every layer of an `EvictingCache` (token indices `[H_kv, N]`, the bin's and the reserve's `[M]`)."""
    holding, binned, reserved, heads = [], [], [], 1
    for layer, aside in zip(cache.layers, cache.asides):
        held = layer.token_index.cpu().numpy() if layer.token_index is not None else np.zeros((1, 0), np.int64)
        heads = held.shape[0]
        layer_holding = []
        for image in images:
            counts = np.zeros(image.count, dtype=np.int32)
            slot = held - image.start
            inside = (slot >= 0) & (slot < image.count)
            np.add.at(counts, slot[inside], 1)
            layer_holding.append(counts)
        holding.append(layer_holding)
        binned.append([_members(aside.bin.token_index, image) for image in images])
        reserved.append([_members(aside.reserve.token_index, image) for image in images])
    return KeptMap(step, list(images), heads, holding, binned, reserved)


def _members(index: torch.Tensor, image: ImageSlots) -> np.ndarray:
    """`[slots]` bool: which of the image's slots are among these token indices."""
    found = np.zeros(image.count, dtype=bool)
    slot = index.cpu().numpy() - image.start
    found[slot[(slot >= 0) & (slot < image.count)]] = True
    return found


def kept_json(kept: KeptMap, layouts: list[dict] | None = None) -> dict:
    """The JSON form: per image, per layer, a mask string with one character per slot,
    `#` held by every head, `+` by some (then `heads_holding` lists the count per slot),
    `b` in the recycle bin, `r` set aside in the reserve, `.` gone. `layouts` (one dict per image, e.g. its crop grid) is
    merged into each image's entry so the picture can be redrawn from the JSON alone."""
    images = []
    for i, image in enumerate(kept.images):
        layers = []
        for layer in range(kept.num_layers):
            counts = kept.heads_holding[layer][i]
            mask = np.full(image.count, ".", dtype="<U1")
            mask[kept.in_bin[layer][i]] = "b"
            mask[kept.reserved(layer, image.index)] = "r"
            mask[counts > 0] = "+"
            mask[counts == kept.heads] = "#"
            entry = {"layer": layer, "held": kept.tokens_held(layer, image.index),
                     "in_bin": kept.tokens_in_bin(layer, image.index),
                     "in_reserve": kept.tokens_in_reserve(layer, image.index), "mask": "".join(mask)}
            if ((counts > 0) & (counts < kept.heads)).any():
                entry["heads_holding"] = counts.tolist()
            layers.append(entry)
        entry = {"image": image.index, "first_position": image.start, "slots": image.count}
        entry.update(layouts[i] if layouts else {})
        entry["layers"] = layers
        images.append(entry)
    return {"step": kept.step, "kv_heads": kept.heads, "images": images}
