"""What the cache holds of each image: one row per image, so a user sees which image lost what.

A pure function of a `CacheStats` snapshot, like the rest of the display."""

from __future__ import annotations

from rich.table import Table

from hae_cli.cache.stats import CacheStats


def image_rows(stats: CacheStats) -> list[tuple[str, int, int, int, int, int]]:
    """(label, slots fed, fewest held in a layer, most held, held by the last layer, in the
    last layer's bin) per image."""
    rows = []
    for k, size in enumerate(stats.image_sizes):
        held = [layer.tokens_by_image[k] for layer in stats.layers if k < len(layer.tokens_by_image)]
        if not held:
            continue
        last = stats.layers[-1]
        binned = last.bin_by_image[k] if k < len(last.bin_by_image) else 0
        rows.append((f"image {k + 1}", size, min(held), max(held), held[-1], binned))
    return rows


def reserved_by_image(stats: CacheStats) -> list[int]:
    """Per image, what the last layer set aside in its reserve (a conversation's prefill drops,
    kept off the attention path for a later question); all zeros outside a conversation."""
    last = stats.layers[-1] if stats.layers else None
    if last is None:
        return []
    return [last.reserve_by_image[k] if k < len(last.reserve_by_image) else 0 for k in range(len(stats.image_sizes))]


PER_LAYER_COLUMNS = 8  # up to this many layers, a column each; deeper models get a range


def image_table(stats: CacheStats) -> Table | None:
    """Per image: its slots, what each layer holds of them (a column per layer up to
    `PER_LAYER_COLUMNS`, else fewest-most), the last layer's share (index broadcasting makes it
    the scoring layer's choice), the last layer's bin and, in a conversation, its reserve."""
    rows = image_rows(stats)
    if not rows:
        return None
    per_layer = len(stats.layers) <= PER_LAYER_COLUMNS
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    table.add_column("image")
    table.add_column("slots", justify="right")
    if per_layer:
        for layer in stats.layers:
            table.add_column(f"L{layer.layer}", justify="right")
    else:
        table.add_column("held (layers)", justify="right")
        table.add_column("last layer", justify="right")
    table.add_column("kept %", justify="right")
    table.add_column("bin", justify="right")
    reserved = reserved_by_image(stats)
    if any(reserved):
        table.add_column("reserve", justify="right")
    for k, (label, size, fewest, most, last, binned) in enumerate(rows):
        if per_layer:
            held = [str(layer.tokens_by_image[k]) for layer in stats.layers]
        else:
            held = [str(fewest) if fewest == most else f"{fewest}-{most}", str(last)]
        extra = [str(reserved[k])] if any(reserved) else []
        table.add_row(label, str(size), *held, f"{100 * last / max(1, size):.0f}", str(binned), *extra)
    return table
