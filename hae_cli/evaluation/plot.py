"""Accuracy against KV cut, one line per policy: `hae eval`'s PNG and the benchmarks'."""

from __future__ import annotations

import textwrap
from collections import defaultdict
from pathlib import Path

# A marker and line style per policy, so a baseline that ties HAE (mustdrop at HAE's kept
# count on one-word answers) still shows on top of it.
POLICY_STYLES = {
    "full": dict(marker="*", markersize=12, linestyle="none"),
    "hae": dict(marker="o", linewidth=2.5, zorder=3),
    "mustdrop": dict(marker="x", markersize=9, linewidth=1.2, linestyle="--", zorder=4),
    "fastv": dict(marker="s", linewidth=1.2),
    "snapkv": dict(marker="^", linewidth=1.2),
    "h2o": dict(marker="v", linewidth=1.2),
    "streaming": dict(marker="D", linewidth=1.2, linestyle=":"),
    "random": dict(marker="P", linewidth=1.2, linestyle="-."),
    "fewer crops": dict(marker="h", markersize=9, linewidth=1.2, linestyle=(0, (1, 1))),
}


def draw_curves(ax, rows: list[dict], title: str, ylabel: str, metric: str) -> None:
    """One line per policy over its budgets; HAE settings outside its main series (other
    prefills, ablations) are single labelled points, not joined to the line."""
    by_policy: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    singles: list[tuple[float, float, str]] = []
    for r in rows:
        point = (r["cut_pct"], 100 * r[metric], r["setting"])
        is_series = r["policy"] != "hae" or r["setting"] == "hae (no budget)" or r["setting"].startswith("hae B=") \
            or not any(x["setting"].startswith("hae B=") or x["setting"] == "hae (no budget)" for x in rows)
        (by_policy["fewer crops" if r.get("crops") else r["policy"]] if is_series else singles).append(point)
    for policy, points in by_policy.items():
        points.sort()
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        ax.plot(xs, ys, label=policy, **POLICY_STYLES.get(policy, dict(marker="o", linewidth=1.2)))
    for x, y, label in singles:
        ax.plot([x], [y], marker="D", color="grey", linestyle="none", zorder=4)
        short = label.replace("hae thr ", "").replace(" (no budget)", "").replace("budget=0.25 buffer=8 ", "B=0.25 ")
        ax.annotate(textwrap.fill(short, 28), (x, y), textcoords="offset points", xytext=(-6, 0), ha="right", va="center", fontsize=6.5)
    ax.set_xlabel("KV cut vs full cache (%)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_accuracy(path: Path, rows: list[dict], title: str, subtitle: str) -> None:
    """Each policy's accuracy over its settings against the KV cut they reach: one panel, and
    one more per question type where the data has types."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(t for r in rows for t in r.get("by_type", {})))
    panels = [(title, rows)] + [(f"{kind} ({rows[0]['by_type'][kind]['questions']} questions)",
                                 [{**r, "accuracy": r["by_type"][kind]["accuracy"]} for r in rows if kind in r["by_type"]])
                                for kind in kinds]
    columns = 1 if len(panels) == 1 else 4
    lines = -(-len(panels) // columns)
    fig, axes = plt.subplots(lines, columns, figsize=(7.5 if columns == 1 else 20, 5.2 * lines), squeeze=False)
    for ax, (panel_title, panel_rows) in zip(axes.flat, panels):
        draw_curves(ax, panel_rows, panel_title, "accuracy %", "accuracy")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(textwrap.fill(subtitle, width=110), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120 if columns == 1 else 80)
    plt.close(fig)
