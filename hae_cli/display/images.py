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


def image_table(stats: CacheStats) -> Table | None:
    """Per image: its slots, what the layers hold of them (fewest-most, and the last layer, which
    index broadcasting makes equal to the scoring layer's choice), and the last layer's bin."""
    rows = image_rows(stats)
    if not rows:
        return None
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for name, justify in (("image", "left"), ("slots", "right"), ("held (layers)", "right"),
                          ("last layer", "right"), ("kept %", "right"), ("bin", "right")):
        table.add_column(name, justify=justify)
    for label, size, fewest, most, last, binned in rows:
        span = str(fewest) if fewest == most else f"{fewest}-{most}"
        table.add_row(label, str(size), span, str(last), f"{100 * last / max(1, size):.0f}", str(binned))
    return table
