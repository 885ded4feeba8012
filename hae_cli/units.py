"""Sizes and shares as hae writes them: in the panel, the tables, notes and error lines alike
(no display library needed, so the engine and the errors can write them too)."""

from __future__ import annotations


def format_bytes(n: int | float | None) -> str:
    """Bytes in the largest binary unit under 1024 of it: "1.5 MiB"; "n/a" for None."""
    if n is None:
        return "n/a"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # unreachable


def cut_percent(held: int, full: int) -> float | None:
    """How much smaller the cache is than the full cache, in percent (positive = saved)."""
    if not full:
        return None
    return 100.0 * (1 - held / full)
