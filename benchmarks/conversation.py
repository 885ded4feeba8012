"""Conversations over 4 and 8 easy-VQA test images, every policy at matched KV: accuracy per turn.

Each conversation (`hae_testing.data.conversation_sets.conversation_sets`, seeded) feeds its images
first, as the prefill every policy compresses before any question is known, then asks 4-6
questions in turn, each answer staying in the cache: `hae eval --task chat` items run by its
engine (`hae_cli.evaluation`: one `Conversation` per setting, the matching, the workers); this
file builds the conversations and sums their turns. A question names its image by label
("what shape is in image 3?", "which image shows a red shape?"), so a later question often asks
about an image the earlier ones did not: what the prefill dropped is gone for every later turn.

Matching (`hae_cli.evaluation.matching`, as `hae eval` and `benchmarks/accuracy.py`): each HAE
setting runs first; snapkv / h2o / streaming then get HAE's tokens per layer after the prefill
as their budget (the decode budget too, so every budgeted policy holds the same rows through
the turns), mustdrop its dual-attention filter keeping as many image tokens as HAE kept, fastv
the same share of image tokens dropped after its layer K. KV is the bytes held after every step
(prefill, each turn's feed, each decoded token): what attention reads, averaged over the
conversation; the full cache runs in the same process on the same conversations, so every cut
is a ratio of two measurements. What lies off the attention path (HAE's recycle bin and the
reserve a prefill sets aside for later questions: host memory on CUDA) is reported beside it
("host"), never counted in the cut.

    python benchmarks/conversation.py                       # 60 conversations of 4 and of 8 images
    python benchmarks/conversation.py --conversations 10 --images 4 --workers 1

Writes benchmarks/results/conversation.json and conversation.png (accuracy vs KV cut).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import textwrap
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

from hae_cli.evaluation import matching  # noqa: E402  (Setting, matched budgets, the equal-KV comparison)
from hae_cli.evaluation.plot import POLICY_STYLES  # noqa: E402
from hae_cli.evaluation.records import Item, Question  # noqa: E402
from hae_cli.evaluation.runner import EvalConfig  # noqa: E402
from hae_cli.evaluation.summary import EQUAL_KV_CAPTION, equal_kv_table  # noqa: E402

DEFAULT_HAE = "thr,thr:image_floor=0.1,thr:image_floor=0.25,thr:r_g=3:r_i=0.9:image_floor=0.1"
MAX_TURNS = 6


def question_kind(question: str) -> str:
    return "which" if question.startswith("which image") else "addressed"


def conversation_items(conversations, split: str) -> list[Item]:
    """Seeded conversations as `hae eval --task chat` items: the images, then each question."""
    from hae_testing.data import easyvqa

    return [Item(str(k), tuple(str(easyvqa.image_path(i, split)) for i in image_ids),
                 tuple(Question(turn.question) for turn in turns), f"conversation {k}")
            for k, (image_ids, turns) in enumerate(conversations)]


def summarize(setting: matching.Setting, results: list[dict], full: list[dict], conversations) -> dict:
    """One row: `results` and `full` are the setting's and the full cache's results on each
    conversation (`ItemRunner`'s, with host bytes and each turn's restores); a turn is right
    when its answer is the expected word exactly."""
    correct = [[answer == turn.answer for answer, turn in zip(r["answers"], turns)]
               for r, (_, turns) in zip(results, conversations)]
    full_correct = [[answer == turn.answer for answer, turn in zip(r["answers"], turns)]
                    for r, (_, turns) in zip(full, conversations)]
    per_turn = defaultdict(list)
    by_kind = defaultdict(list)
    for right, (_, turns) in zip(correct, conversations):
        for t, (ok, turn) in enumerate(zip(right, turns), start=1):
            per_turn[t].append(ok)
            by_kind[question_kind(turn.question)].append(ok)
    answered = [ok for right in correct for ok in right]
    full_answered = [ok for right in full_correct for ok in right]
    kv_mean = statistics.fmean(r["kv_mean"] for r in results)
    full_mean = statistics.fmean(r["kv_mean"] for r in full)
    return {
        **setting.row_head(),
        "conversations": len(results),
        "questions": len(answered),
        "accuracy": sum(answered) / len(answered),
        "drop_points": 100 * (sum(full_answered) - sum(answered)) / len(answered),
        "accuracy_by_turn": {t: sum(v) / len(v) for t, v in sorted(per_turn.items())},
        "questions_by_turn": {t: len(v) for t, v in sorted(per_turn.items())},
        "accuracy_by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
        "questions_by_kind": {k: len(v) for k, v in sorted(by_kind.items())},
        "all_turns_right": sum(all(right) for right in correct) / len(results),
        "kv_bytes_mean": kv_mean,
        "kv_bytes_peak": statistics.fmean(r["kv_peak"] for r in results),
        "cut_pct": 100 * (1 - kv_mean / full_mean),
        "restored": sum(r["restored"] for r in results),
        "binned": sum(r["binned"] for r in results),
        "restored_per_turn": statistics.fmean(n for r in results for n in r["restored_by_turn"]),
        "host_bytes_mean": statistics.fmean(r["host_mean"] for r in results),
        "host_bytes_peak": statistics.fmean(r["host_peak"] for r in results),
    }


def baseline_spread(rows: list[dict], low: float, high: float) -> dict | None:
    """Best minus worst baseline accuracy among the baseline rows whose cut is in [low, high]."""
    inside = [r for r in rows if r["policy"] not in ("full", "hae") and low <= r["cut_pct"] <= high]
    if not inside:
        return None
    best, worst = max(inside, key=lambda r: r["accuracy"]), min(inside, key=lambda r: r["accuracy"])
    return {"cut_range_pct": [low, high], "rows": len(inside), "best": best["setting"], "best_accuracy": best["accuracy"],
            "worst": worst["setting"], "worst_accuracy": worst["accuracy"],
            "spread_points": 100 * (best["accuracy"] - worst["accuracy"])}


# --------------------------------------------------------------------------- output

COLUMNS = ("setting", "accuracy %", "drop (pts)", "about image k %", "which image %",
           *(f"turn {t} %" for t in range(1, MAX_TURNS + 1)),
           "all right %", "KV mean MiB", "KV peak MiB", "cut %", "host mean MiB", "restored / turn", "binned",
           "restored")


def table_rows(rows: list[dict]) -> list[list]:
    out = []
    for r in rows:
        by_turn = r["accuracy_by_turn"]
        kinds = r["accuracy_by_kind"]
        out.append([r["setting"], 100 * r["accuracy"], r["drop_points"],
                    *(100 * kinds[k] if k in kinds else None for k in ("addressed", "which")),
                    *(100 * by_turn[t] if t in by_turn else None for t in range(1, MAX_TURNS + 1)),
                    100 * r["all_turns_right"], common.mib(r["kv_bytes_mean"]), common.mib(r["kv_bytes_peak"]),
                    r["cut_pct"], common.mib(r["host_bytes_mean"]), r["restored_per_turn"], r["binned"],
                    r["restored"]])
    return out


def plot(path: Path, by_images: dict[int, list[dict]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(by_images), figsize=(6.5 * len(by_images), 4.8), squeeze=False)
    for ax, (n, rows) in zip(axes[0], sorted(by_images.items())):
        series = defaultdict(list)
        for r in rows:
            series[r["policy"]].append((r["cut_pct"], 100 * r["accuracy"]))
        for policy, points in series.items():
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], label=policy,
                    **POLICY_STYLES.get(policy, dict(marker="o", linewidth=1.2)))
        ax.set_xlabel("KV cut vs full cache (%), mean over the conversation")
        ax.set_ylabel("answers right %")
        ax.set_title(f"conversations of {n} images (questions after the images)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(textwrap.fill(title, width=int(15 * 6.5 * len(by_images))), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="checkpoint: demo, a folder or a hub id (default: demo)")
    parser.add_argument("--split", default="test", help="easy-VQA split (default: test; tune on train)")
    parser.add_argument("--images", default="4,8", help="images per conversation (default 4,8)")
    parser.add_argument("--conversations", type=int, default=60, help="seeded conversations per size (default 60)")
    parser.add_argument("--turns", default="4,6", help="questions per conversation, min,max (default 4,6)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the conversations")
    parser.add_argument("--hae", default=DEFAULT_HAE, help=f"HAE settings, as benchmarks/accuracy.py's --hae (default {DEFAULT_HAE})")
    parser.add_argument("--baselines", default=",".join(matching.BASELINES), help="baselines at matched KV")
    parser.add_argument("--fastv-layer", type=int, default=2, help="FastV's K (default 2)")
    parser.add_argument("--spread-cuts", default="70,80", help="cut range (%%) for the best-minus-worst baseline spread")
    parser.add_argument("--workers", type=int, default=2, help="processes, 1 thread each (default 2; 1 = in this process)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process (0 = default; workers 1)")
    parser.add_argument("--out-dir", default=None, help="where to write conversation.json / .png (default benchmarks/results)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from hae_cli.api import load_model
    from hae_testing.data.conversation_sets import conversation_sets

    started = time.perf_counter()
    common.set_threads(args.threads)
    cond = common.conditions(model=args.model, workers=args.workers)
    hae = matching.hae_settings(args.hae)
    baselines = common.parse_list(args.baselines)
    unknown = sorted(set(baselines) - set(matching.BASELINES))
    if unknown:
        raise SystemExit(f"unknown baseline {unknown[0]!r}; choose from {', '.join(matching.BASELINES)}")
    plan = matching.matched_plan(hae, baselines)
    low, high = common.parse_list(args.spread_cuts, float)
    turns = tuple(common.parse_list(args.turns, int))
    out: dict = {"benchmark": "conversation", "conditions": cond, "args": vars(args), "by_images": {}}
    loaded = load_model(args.model) if args.workers <= 1 else None  # --workers 1 answers here
    config = EvalConfig(model=args.model, task="chat", plan=tuple(plan), fastv_layer=args.fastv_layer,
                        max_new_tokens=3, host_and_turns=True)
    by_images: dict[int, list[dict]] = {}
    for n in common.parse_list(args.images, int):
        conversations = conversation_sets(args.split, args.conversations, n, turns, seed=args.seed + n)
        by_id = common.run_engine(conversation_items(conversations, args.split), config, args, loaded,
                                  f"conversations x{n}")
        results = [by_id[str(k)]["settings"] for k in range(len(conversations))]
        rows = [summarize(s, [r[s.label] for r in results], [r["full"] for r in results], conversations)
                for s in plan]
        comparison = matching.equal_kv_comparison(rows, hae, baselines)
        spread = baseline_spread(rows, low, high)
        by_images[n] = rows
        out["by_images"][str(n)] = {"conversations": len(conversations), "questions": rows[0]["questions"],
                                    "rows": rows, "equal_kv": comparison, "baseline_spread": spread}
        common.print_table(
            f"conversations of {n} {args.split} images, {len(conversations)} seeded (seed {args.seed + n}), "
            f"{rows[0]['questions']} questions after the images; model {args.model}",
            COLUMNS, table_rows(rows), caption=common.describe_conditions(cond))
        columns, comparison_rows = equal_kv_table(comparison, baselines)
        common.print_table("accuracy % at HAE's KV bytes", columns, comparison_rows, caption=EQUAL_KV_CAPTION)
        if spread is not None:
            print(f"baseline spread at {low:.0f}-{high:.0f}% cut: {spread['spread_points']:.1f} points "
                  f"({spread['best']} {100 * spread['best_accuracy']:.1f}% vs {spread['worst']} {100 * spread['worst_accuracy']:.1f}%)")
    out["seconds"] = round(time.perf_counter() - started, 1)
    out["conditions"]["ended_with_training_running"] = bool(common.other_heavy_processes())
    path = common.write_json("conversation", out, args.out_dir)
    if not args.no_plot:
        png = path.with_suffix(".png")
        plot(png, by_images, f"{args.model}; {common.describe_conditions(cond)}")
        out["plot"] = str(png)
    print(f"wrote {path} in {out['seconds']} s")
    return out


if __name__ == "__main__":
    main()
