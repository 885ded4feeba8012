"""Cache occupancy over decode steps, one line per policy (`hae profile --plot FILE.png`).

matplotlib is an optional extra (`pip install 'hae-cli[plot]'`), imported only here and
only when a plot is asked for; it draws with the Agg canvas, so no display is needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from hae_cli.cache.stats import CacheStats
from hae_cli.checks import write_failed
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


def image_means(stats: CacheStats) -> list[float]:
    """Tokens held of each image (index k-1), mean over layers."""
    layers = [layer.tokens_by_image for layer in stats.layers if layer.tokens_by_image]
    return [sum(held) / len(layers) for held in zip(*layers)] if layers else []


def occupancy_figure(runs: Mapping[str, Sequence[CacheStats]], title: str | None = None, full: str | None = "baseline"):
    """The figure `plot_occupancy` writes. Left: tokens held per layer over decode steps, the mean
    over layers as a line (its own colour, style and marker per policy), the spread between the
    emptiest and the fullest layer as a band, whole steps on the x axis; the full cache (run
    `full`) in a panel of its own above, so that its scale does not flatten the compressed
    policies. Right: tokens each policy holds of each image at the last step, as bars against
    the image's slots. The title (which prompt this is) wraps to the figure's width."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise HaeError("--plot needs matplotlib: pip install 'hae-cli[plot]'") from None
    import textwrap

    styled = {name: (index, steps) for index, (name, steps) in enumerate(runs.items()) if occupancy_series(steps)[0]}
    if styled and not has_curve(runs):
        return _per_layer_figure(styled, title)
    apart = full if full in styled and len(styled) > 1 else None
    figure = Figure(figsize=(12, 6), dpi=100)
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(2, 2, height_ratios=(1, 3) if apart else (0.001, 1), width_ratios=(3, 2),
                               hspace=0.3, wspace=0.22)
    lines = figure.add_subplot(grid[1, 0])
    top = figure.add_subplot(grid[0, 0], sharex=lines) if apart else None
    bars = figure.add_subplot(grid[:, 1])

    for name, (index, steps) in styled.items():
        axes = top if name == apart else lines
        x, mean, low, high = occupancy_series(steps)
        (line,) = axes.plot(x, mean, label=name, color=f"C{index % 10}", linewidth=1.6, markersize=5,
                            markevery=max(1, len(x) // 12), **line_style(index))
        if low != high:
            axes.fill_between(x, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
    for axes in (lines, top) if top is not None else (lines,):
        axes.grid(True, alpha=0.3)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        if axes.lines:
            axes.legend(loc="upper left", fontsize=8, ncol=3)
    if top is not None:
        top.tick_params(labelbottom=False)
        top.set_title("full cache", fontsize=9, loc="left")
    lines.set_title("compressed policies, on their own scale (line: mean over layers; band: min to max layer)"
                    if top is not None else "line: mean over layers; band: min to max layer", fontsize=9, loc="left")
    lines.set_ylim(bottom=0, top=max([1.0] + [max(occupancy_series(steps)[3]) for name, (_, steps) in styled.items()
                                              if name != apart]) * 1.25)
    lines.set_xlabel("decode step (0 = after prefill)")
    lines.set_ylabel("tokens held per layer")

    _image_bars(bars, {name: steps[-1] for name, (_, steps) in styled.items() if name != apart},
                {name: index for name, (index, _) in styled.items()})
    heading = title or "KV cache occupancy"
    figure.suptitle("\n".join(textwrap.wrap(heading, 120)), fontsize=10)
    figure.subplots_adjust(left=0.07, right=0.98, bottom=0.1, top=0.86 if len(heading) > 120 else 0.9)
    return figure


def has_curve(runs: Mapping[str, Sequence[CacheStats]]) -> bool:
    """Some run decoded past its first step: occupancy over the steps is a curve worth drawing
    (a one-token answer is the prefill and at most one step: two points, no curve)."""
    return any(len(occupancy_series(steps)[0]) > 2 for steps in runs.values())


def _per_layer_figure(styled: Mapping[str, tuple[int, Sequence[CacheStats]]], title: str | None):
    """For answers too short for a curve: tokens each policy holds in each layer at its last
    step, as grouped bars (where a policy prunes, and how far), beside the per-image bars."""
    import textwrap

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(12, 6), dpi=100)
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(1, 2, width_ratios=(3, 2), wspace=0.22)
    layers, bars = figure.add_subplot(grid[0, 0]), figure.add_subplot(grid[0, 1])
    finals = {name: steps[-1] for name, (_, steps) in styled.items()}
    width = 0.8 / max(1, len(finals))
    most = 1
    for n, (name, stats) in enumerate(finals.items()):
        index = styled[name][0]
        held = [layer.tokens_held for layer in stats.layers]
        most = max([most] + held)
        positions = [k - 0.4 + width * (n + 0.5) for k in range(len(held))]
        layers.bar(positions, held, width=width, label=name, color=f"C{index % 10}",
                   hatch=("", "//", "..", "xx", "\\\\", "++")[index % 6], edgecolor="white", linewidth=0.5)
    count = max(len(stats.layers) for stats in finals.values())
    layers.set_xticks(range(count))
    layers.xaxis.set_major_locator(MaxNLocator(integer=True))
    layers.yaxis.set_major_locator(MaxNLocator(integer=True))
    layers.set_ylim(bottom=0, top=most * 1.25)
    layers.set_xlabel("layer (0 = the first)")
    layers.set_ylabel("tokens held")
    steps = max(len(steps) for _, steps in styled.values()) - 1
    layers.set_title(f"tokens held per layer at the end (the answers took {steps} decode step{'s' if steps != 1 else ''}"
                     ": too few for a curve over the steps)", fontsize=9, loc="left")
    layers.legend(loc="upper left", fontsize=8, ncol=3)
    layers.grid(True, axis="y", alpha=0.3)
    _image_bars(bars, finals, {name: index for name, (index, _) in styled.items()})
    heading = title or "KV cache occupancy"
    figure.suptitle("\n".join(textwrap.wrap(heading, 120)), fontsize=10)
    figure.subplots_adjust(left=0.07, right=0.98, bottom=0.1, top=0.86 if len(heading) > 120 else 0.9)
    return figure


def _image_bars(axes, finals: Mapping[str, CacheStats], colours: Mapping[str, int]) -> None:
    """Grouped bars: per image, tokens each policy holds of it at its last step (mean over layers)."""
    means = {name: image_means(stats) for name, stats in finals.items()}
    images = max((len(m) for m in means.values()), default=0)
    axes.set_title("tokens held of each image at the last step (mean over layers)", fontsize=9, loc="left")
    if not images:
        axes.text(0.5, 0.5, "no images in this prompt", ha="center", va="center", transform=axes.transAxes)
        axes.set_axis_off()
        return
    width = 0.8 / max(1, len(means))
    for n, (name, held) in enumerate(means.items()):
        positions = [k + 1 - 0.4 + width * (n + 0.5) for k in range(len(held))]
        axes.bar(positions, held, width=width, label=name, color=f"C{colours[name] % 10}",
                 hatch=("", "//", "..", "xx", "\\\\", "++")[colours[name] % 6], edgecolor="white", linewidth=0.5)
    sizes = next((stats.image_sizes for stats in finals.values() if stats.image_sizes), [])
    for k, size in enumerate(sizes):
        axes.hlines(size, k + 0.55, k + 1.45, colors="black", linestyles="--", linewidth=1,
                    label="image slots" if k == 0 else None)
    axes.set_xticks(range(1, images + 1), [f"image {k}" for k in range(1, images + 1)])
    axes.set_ylabel("tokens held")
    tallest = max([max(sizes, default=0)] + [max(held, default=0) for held in means.values()])
    axes.set_ylim(bottom=0, top=max(1.0, tallest) * 1.35)  # room for the legend above the bars
    axes.legend(loc="upper left", fontsize=8, ncol=3)
    axes.grid(True, axis="y", alpha=0.3)


def plot_occupancy(runs: Mapping[str, Sequence[CacheStats]], path: str | Path, title: str | None = None) -> Path:
    """Write `occupancy_figure` as a PNG."""
    path = Path(path)
    figure = occupancy_figure(runs, title)
    if not path.parent.is_dir():
        raise HaeError(f"cannot write the plot: folder {str(path.parent)!r} does not exist")
    try:
        figure.savefig(path, format="png")
    except OSError as error:
        raise write_failed(error, path) from None
    return path
