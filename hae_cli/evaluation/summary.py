"""What a run comes to, per setting: accuracy, KV mean and peak and their cut against the full
cache on the same items, speed; the equal-KV verdicts; the largest cut within a tolerance.

Computed from the results as stored (`results.jsonl`), in the data's order, so a run that was
stopped and resumed sums the same numbers in the same order as one that never stopped. Only
`speed` (and the run's own timing) differs between two runs of the same items.
"""

from __future__ import annotations

import statistics

from hae_cli.evaluation.matching import Setting, choose_best, equal_kv_comparison

MIB = 2**20


def summarize(plan: list[Setting], results: list[dict], target_drop: float = 1.0, warnings: list[str] = ()) -> dict:
    """`results`: the items' results in the data's order (those that ran; not the failed);
    `warnings`: what the caller knows the summary must say (a resumed file's foreign lines)."""
    full = [r["settings"]["full"] for r in results]
    types = [r.get("types") for r in results]
    rows = [setting_row(setting, [r["settings"][setting.label] for r in results], full, types) for setting in plan]
    matched = [s for s in plan if s.matched_to is None and any(t.matched_to == s.label for t in plan)]
    baselines = list(dict.fromkeys(s.policy for s in plan if s.matched_to is not None))
    hae_rows = [r for r in rows if r["policy"] == "hae"]
    warnings = list(warnings)
    if rows[0]["accuracy"] == 0:  # a cut "within 1 point" of nothing says nothing
        warnings.append(f"the full cache answers none of the {rows[0]['questions']} questions right (0%): the "
                        "references may not be answers (check --answer-column), or the model does not know the "
                        "task; no HAE cut is judged against it")
    best = choose_best(rows, target_drop) if hae_rows and rows[0]["accuracy"] > 0 else None
    return {
        "rows": rows,
        "equal_kv": equal_kv_comparison(rows, matched, baselines) if matched and baselines else [],
        "target_drop_points": target_drop,
        "best_hae": None if best is None else {
            "setting": best["setting"], "accuracy": best["accuracy"], "drop_points": best["drop_points"],
            "cut_pct": best["cut_pct"], "within_target": best["drop_points"] <= target_drop},
        "warnings": warnings,
    }


def best_line(best: dict, target_drop: float) -> str:
    """The summary's verdict in words: the largest HAE cut within the target, or, when none is,
    the closest setting; a drop said as below (or above) the full cache, never as a signed number."""
    points = f"{target_drop:g} point{'' if target_drop == 1 else 's'}"
    drop = best["drop_points"]
    against = ("the full cache's accuracy" if abs(drop) < 0.005 else
               f"{drop:.2f} points below the full cache" if drop > 0 else f"{-drop:.2f} points above the full cache")
    what = f"{best['setting']}, {best['cut_pct']:.1f}% less KV, {100 * best['accuracy']:.2f}% accuracy ({against})"
    if best["within_target"]:
        return f"largest HAE cut within {points} of the full cache: {what}"
    return f"no HAE setting is within {points} of the full cache; the closest: {what}"


def setting_row(setting: Setting, results: list[dict], full: list[dict], types: list | None = None) -> dict:
    """One setting over the items; `full` is the full cache on the same items (same run);
    `types`: each item's question types (None where it has none), for `by_type`."""
    scores = [s for r in results for s in r["scores"]]
    full_scores = [s for r in full for s in r["scores"]]
    kv_mean = statistics.fmean(r["kv_mean"] for r in results)
    kv_peak = statistics.fmean(r["kv_peak"] for r in results)
    full_mean = statistics.fmean(r["kv_mean"] for r in full)
    full_peak = statistics.fmean(r["kv_peak"] for r in full)
    accuracy = sum(scores) / len(scores)
    by_metric: dict[str, list[float]] = {}
    for r in results:
        for metric, score in zip(r["metrics"], r["scores"]):
            by_metric.setdefault(metric, []).append(score)
    by_type: dict[str, list[float]] = {}
    for r, kinds in zip(results, types or [None] * len(results)):
        for kind, score in zip(kinds or (), r["scores"]):
            if kind is not None:
                by_type.setdefault(kind, []).append(score)
    decode_seconds = sum(r["timings"]["decode_seconds"] for r in results)
    decode_tokens = sum(r["timings"]["decode_tokens"] for r in results)
    return {
        **setting.row_head(),
        "items": len(results),
        "questions": len(scores),
        "accuracy": accuracy,
        "drop_points": 100 * (sum(full_scores) / len(full_scores) - accuracy),
        "by_metric": {m: {"questions": len(v), "accuracy": sum(v) / len(v)} for m, v in sorted(by_metric.items())},
        "by_type": {t: {"questions": len(v), "accuracy": sum(v) / len(v)} for t, v in sorted(by_type.items())},
        "same_as_full": sum(same for r in results for same in r["same_as_full"]) / len(scores),
        "agreement": statistics.fmean(a for r in results for a in r["agreement"]),
        "kv_bytes_mean": kv_mean,
        "kv_bytes_peak": kv_peak,
        "cut_pct": 100 * (1 - kv_mean / full_mean),
        "peak_cut_pct": 100 * (1 - kv_peak / full_peak),
        "restored": sum(r["restored"] for r in results),
        "binned": sum(r["binned"] for r in results),
        "speed": {
            "decode_tokens_per_second": decode_tokens / decode_seconds if decode_seconds > 0 else None,
            "prefill_ms_mean": 1000 * statistics.fmean(r["timings"]["prefill_seconds"] for r in results),
        },
    }


# --------------------------------------------------------------------------- tables


ROW_COLUMNS = ("setting", "accuracy %", "drop (pts)", "same as full %", "KV mean MiB", "KV peak MiB", "cut %",
               "peak cut %", "decode tok/s", "prefill ms")


def table_rows(rows: list[dict]) -> list[list]:
    return [[r["setting"], 100 * r["accuracy"], r["drop_points"], 100 * r["same_as_full"], r["kv_bytes_mean"] / MIB,
             r["kv_bytes_peak"] / MIB, r["cut_pct"], r["peak_cut_pct"], r["speed"]["decode_tokens_per_second"],
             r["speed"]["prefill_ms_mean"]] for r in rows]


def by_type_table(rows: list[dict]) -> tuple[list[str], list[list]] | None:
    """(columns, rows): each setting's accuracy % per question type, with its cut; None without types."""
    kinds = list(dict.fromkeys(t for r in rows for t in r["by_type"]))
    if not kinds:
        return None
    columns = ["setting", "cut %"] + [f"{t} ({rows[0]['by_type'][t]['questions']})" for t in kinds]
    return columns, [[r["setting"], r["cut_pct"]] + [100 * r["by_type"][t]["accuracy"] if t in r["by_type"] else None
                                                     for t in kinds] for r in rows]


EQUAL_KV_CAPTION = ("* the baseline's curve never reaches this cut (no equal-KV point): its nearest point, which holds "
                    "more KV, is shown and counts only in the last column; >hae: the baseline is more accurate")


def equal_kv_table(comparison: list[dict], baselines: list[str]) -> tuple[list[str], list[list]]:
    """(columns, rows) of the equal-KV verdicts: per HAE setting, each baseline at its KV."""
    rows = []
    for entry in comparison:
        row = [entry["hae"], f"{100 * entry['hae_accuracy']:.2f} @ {entry['hae_cut_pct']:.1f}%"]
        for baseline in baselines:
            b = entry["baselines"].get(baseline)
            if b is None:
                row.append(None)
                continue
            cell = f"{100 * b['compared_accuracy']:.2f}"
            if b["accuracy_at_equal_kv"] is None:
                cell += "*"
            row.append(cell + ("" if b["hae_at_or_above"] else " >hae"))
        row.append("yes" if entry["hae_at_or_above_all"] else "no")
        row.append("yes" if entry["hae_at_or_above_all_or_nearest"] else "no")
        rows.append(row)
    return ["HAE setting", "hae acc @ cut"] + baselines + ["hae >= all at equal KV", "also >= nearest*"], rows


def rich_table(title: str, columns, rows, caption: str = ""):
    """A Rich table: the first column left, numbers right, 4 significant digits."""
    from rich.table import Table

    table = Table(title=title, caption=caption or None, caption_justify="left")
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(cell_text(v) for v in row))
    return table


def cell_text(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
