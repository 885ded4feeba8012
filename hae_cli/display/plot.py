"""Cache occupancy over decode steps, one line per policy (`hae profile --plot FILE.png`).

matplotlib is an optional extra (`pip install 'hae-cli[plot]'`), imported only here and
only when a plot is asked for; it draws with the Agg canvas, so no display is needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from hae_cli.cache.stats import CacheStats
from hae_cli.errors import HaeError


def occupancy_series(steps: Sequence[CacheStats]) -> tuple[list[int], list[float], list[int], list[int]]:
    """(decode step, mean tokens held per layer, fewest held by a layer, most held by a layer)."""
    x, mean, low, high = [], [], [], []
    for stats in steps:
        held = [layer.tokens_held for layer in stats.layers]
        if not held:
            continue
        x.append(stats.step)
        mean.append(sum(held) / len(held))
        low.append(min(held))
        high.append(max(held))
    return x, mean, low, high


# One (line style, marker) per policy, so policies whose lines overlap can still be told apart,
# in print and without colour too.
LINE_STYLES = tuple(zip(("-", "--", "-.", ":") * 2, ("o", "s", "^", "D", "v", "x", "P", "*")))


def line_style(index: int) -> dict:
    linestyle, marker = LINE_STYLES[index % len(LINE_STYLES)]
    return {"linestyle": linestyle, "marker": marker}


def occupancy_figure(runs: Mapping[str, Sequence[CacheStats]], title: str | None = None):
    """The figure `plot_occupancy` writes: the mean over layers as a line (its own style and
    marker per policy), the spread between the emptiest and the fullest layer as a band, whole
    decode steps on the x axis."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise HaeError("--plot needs matplotlib: pip install 'hae-cli[plot]'") from None

    figure = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    for index, (name, steps) in enumerate(runs.items()):
        x, mean, low, high = occupancy_series(steps)
        if not x:
            continue
        (line,) = axes.plot(x, mean, label=name, linewidth=1.6, markersize=5,
                            markevery=max(1, len(x) // 12), **line_style(index))
        if low != high:
            axes.fill_between(x, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("decode step (0 = after prefill)")
    axes.set_ylabel("tokens held per layer")
    axes.set_title(title or "KV cache occupancy (line: mean over layers; band: min to max layer)")
    axes.grid(True, alpha=0.3)
    axes.set_ylim(bottom=0)
    if runs:
        axes.legend(loc="best")
    figure.tight_layout()
    return figure


def plot_occupancy(runs: Mapping[str, Sequence[CacheStats]], path: str | Path, title: str | None = None) -> Path:
    """Write `occupancy_figure` as a PNG."""
    path = Path(path)
    figure = occupancy_figure(runs, title)
    if not path.parent.is_dir():
        raise HaeError(f"cannot write the plot: folder {str(path.parent)!r} does not exist")
    try:
        figure.savefig(path, format="png")
    except OSError as error:
        raise HaeError(f"cannot write the plot to {str(path)!r}: {error.strerror or error}") from None
    return path
