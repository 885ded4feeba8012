"""Conversations over 4 and 8 easy-VQA test images, every policy at matched KV: accuracy per turn.

Each conversation (`hae_testing.data.conversation_sets.conversation_sets`, seeded) feeds its images
first, as the prefill every policy compresses before any question is known, then asks 4-6
questions in turn through `hae_cli.conversation.Conversation`, each answer staying in the
cache. A question names its image by label ("what shape is in image 3?", "which image shows a
red shape?"), so a later question often asks about an image the earlier ones did not: what
the prefill dropped is gone for every later turn.

Matching (as `benchmarks/accuracy.py`): each HAE setting runs first; snapkv / h2o / streaming
then get HAE's tokens per layer after the prefill as their budget (the decode budget too, so
every budgeted policy holds the same rows through the turns), mustdrop its dual-attention
filter keeping as many image tokens as HAE kept, fastv the same share of image tokens dropped
after its layer K. KV is the bytes held after every step (prefill, each turn's feed, each
decoded token): what attention reads, averaged over the conversation; the full cache runs in
the same process on the same conversations, so every cut is a ratio of two measurements. What
lies off the attention path (HAE's recycle bin and the reserve a prefill sets aside for later
questions: host memory on CUDA) is reported beside it ("host"), never counted in the cut.

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
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402  (also the workers and their image features)

from hae_cli.evaluation import matching  # noqa: E402  (Setting, matched budgets, the equal-KV comparison)
from hae_cli.evaluation.plot import POLICY_STYLES  # noqa: E402
from hae_cli.evaluation.summary import EQUAL_KV_CAPTION, equal_kv_table  # noqa: E402

import torch  # noqa: E402

DEFAULT_HAE = "thr,thr:image_floor=0.1,thr:image_floor=0.25,thr:r_g=3:r_i=0.9:image_floor=0.1"
MAX_TURNS = 6


@dataclass
class ConversationOutcome:
    """One conversation under one setting."""

    correct: list[bool]  # per turn
    kinds: list[str]  # per turn: "addressed" (about image k) or "which" (which image shows ...)
    kv_bytes: list[int]  # held after every step: what attention reads
    full_bytes: list[int]  # what the full cache would hold after the same steps
    host_bytes: list[int]  # off the attention path after every step: the bin and the reserve
    held_after_prefill: int  # tokens per layer (max over layers)
    image_after_prefill: int  # image tokens per layer (max over layers)
    restored: int = 0
    binned: int = 0
    restored_by_turn: list[int] = field(default_factory=list)  # tokens a turn brought back (all layers)
    answers: list[str] = field(default_factory=list)


def run_conversation(loaded, processed, features, turns, policy: str, params: dict) -> ConversationOutcome:
    from hae_cli.conversation import Conversation

    conversation = Conversation(loaded, processed, image_features=features, policy=policy, policy_params=params,
                                max_new_tokens=3)
    first = conversation.prefill_stats
    kv, full, host = [first.bytes_held], [first.full_cache_bytes], [first.host_bytes]
    outcome = ConversationOutcome(
        [], [question_kind(t.question) for t in turns], kv, full, host,
        held_after_prefill=max(layer.tokens_held for layer in first.layers),
        image_after_prefill=max(layer.tokens_by_modality["image"] for layer in first.layers),
    )
    for turn in turns:
        asked = conversation.ask(turn.question)
        kv += [s.bytes_held for s in asked.result.steps]
        full += [s.full_cache_bytes for s in asked.result.steps]
        host += [s.host_bytes for s in asked.result.steps]
        outcome.restored_by_turn.append(asked.actions["restored"])
        outcome.correct.append(asked.result.text == turn.answer)
        outcome.answers.append(asked.result.text)
        outcome.restored += asked.actions["restored"]
        outcome.binned += asked.actions["binned"]
    return outcome


def question_kind(question: str) -> str:
    return "which" if question.startswith("which image") else "addressed"


def one_conversation(task) -> dict[str, ConversationOutcome]:
    """A conversation under every setting (baselines after the HAE setting they match)."""
    (image_ids, turns), plan, fastv_layer = task
    bench = common.workbench()
    pairs = [bench.image(i) for i in image_ids]
    processed, features = [p for p, _ in pairs], [f for _, f in pairs]
    # what the matching counts: the image tokens the prefill compresses
    prompt_tokens = SimpleNamespace(modality=torch.cat([p.modalities for p in processed]))
    return matching.run_plan(
        plan, lambda setting, params: run_conversation(bench.loaded, processed, features, turns, setting.policy, params),
        prompt_tokens, fastv_layer)


def summarize(setting: matching.Setting, outcomes: list[ConversationOutcome], full: list[ConversationOutcome]) -> dict:
    per_turn = defaultdict(list)
    for outcome in outcomes:
        for t, ok in enumerate(outcome.correct, start=1):
            per_turn[t].append(ok)
    by_kind = defaultdict(list)
    for outcome in outcomes:
        for kind, ok in zip(outcome.kinds, outcome.correct):
            by_kind[kind].append(ok)
    answered = [ok for o in outcomes for ok in o.correct]
    full_answered = [ok for o in full for ok in o.correct]
    kv_mean = statistics.fmean(statistics.fmean(o.kv_bytes) for o in outcomes)
    full_mean = statistics.fmean(statistics.fmean(o.kv_bytes) for o in full)
    return {
        **setting.row_head(),
        "conversations": len(outcomes),
        "questions": len(answered),
        "accuracy": sum(answered) / len(answered),
        "drop_points": 100 * (sum(full_answered) - sum(answered)) / len(answered),
        "accuracy_by_turn": {t: sum(v) / len(v) for t, v in sorted(per_turn.items())},
        "questions_by_turn": {t: len(v) for t, v in sorted(per_turn.items())},
        "accuracy_by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
        "questions_by_kind": {k: len(v) for k, v in sorted(by_kind.items())},
        "all_turns_right": sum(all(o.correct) for o in outcomes) / len(outcomes),
        "kv_bytes_mean": kv_mean,
        "kv_bytes_peak": statistics.fmean(max(o.kv_bytes) for o in outcomes),
        "cut_pct": 100 * (1 - kv_mean / full_mean),
        "restored": sum(o.restored for o in outcomes),
        "binned": sum(o.binned for o in outcomes),
        "restored_per_turn": statistics.fmean(r for o in outcomes for r in o.restored_by_turn),
        "host_bytes_mean": statistics.fmean(statistics.fmean(o.host_bytes) for o in outcomes),
        "host_bytes_peak": statistics.fmean(max(o.host_bytes) for o in outcomes),
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


# --------------------------------------------------------------------------- running


def run_all(conversations, plan, args, tag: str) -> dict[str, list[ConversationOutcome]]:
    """Every conversation under every setting, in input order per setting (the workers and
    their per-image features are `_common`'s)."""
    tasks = list(enumerate((c, plan, args.fastv_layer) for c in conversations))
    results: dict[str, list] = defaultdict(lambda: [None] * len(tasks))
    progress = common.Progress(tag, len(tasks), quiet=args.quiet)
    with common.make_pool(args) as pool:
        for done, (index, outcomes) in enumerate(pool.imap_unordered(_indexed, tasks), start=1):
            for label, outcome in outcomes.items():
                results[label][index] = outcome
            progress.update(done)
    return results


def _indexed(item):
    index, task = item
    return index, one_conversation(task)


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
    by_images: dict[int, list[dict]] = {}
    for n in common.parse_list(args.images, int):
        conversations = conversation_sets(args.split, args.conversations, n, turns, seed=args.seed + n)
        results = run_all(conversations, plan, args, f"conversations x{n}")
        rows = [summarize(s, results[s.label], results["full"]) for s in plan]
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
