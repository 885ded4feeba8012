"""Accuracy against KV bytes: easy-VQA and multi-image captions on the demo model, every policy.

Every question is answered under `full`, under each HAE setting, and under each baseline
given the budget that matches that HAE setting's kept size *on the same question*
(snapkv / h2o / streaming: HAE's tokens per layer after prefill; mustdrop: its dual-attention
filter keeping as many image tokens as HAE kept, the top by g_j; fastv: the same share of
image tokens dropped, after its layer K).
The full cache is measured in the same run, so every ratio is a ratio of two measurements.
Every question and caption set is run by `hae eval`'s engine (`hae_cli.evaluation`: its
`ItemRunner` on its backends, its matching, its rows and equal-KV verdicts); this file only
builds the easy-VQA items, scores the captions and prints. A question is right when its
answer matches the reference after VQA normalisation (`hae eval`'s exact match).

    python benchmarks/accuracy.py                        # default: 400 seeded questions + the full split
    python benchmarks/accuracy.py --limit 300 --no-full-split --story-sets 5
    python benchmarks/accuracy.py --hae thr,0.6,0.4,0.25,0.15 --baselines snapkv,h2o

With `--question-after`, each image is cached (and compressed) before its question is fed,
as when one cached image serves several questions: no policy can use the question to choose
what to keep, so one-word answers separate the policies (with the question in the prompt,
snapkv / h2o / streaming answer from full-cache logits and tie with `full` by construction).

Writes benchmarks/results/accuracy.json and accuracy.png (accuracy vs KV cut per policy);
accuracy_question_after.* with `--question-after`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

from hae_cli.evaluation.matching import (  # noqa: E402
    BASELINES, Setting, choose_best, equal_kv_comparison, hae_settings, matched_plan, story_plan,
)
from hae_cli.evaluation.plot import draw_curves  # noqa: E402
from hae_cli.evaluation.records import Item, Question  # noqa: E402
from hae_cli.evaluation.runner import EvalConfig  # noqa: E402
from hae_cli.evaluation.summary import EQUAL_KV_CAPTION, equal_kv_table, setting_row  # noqa: E402

QUESTION_AFTER_NOTE = ", questions fed after the compressed images"  # in table and plot titles


# --------------------------------------------------------------------------- running on the engine


def rows_of(plan: list[Setting], results: list[dict]) -> list[dict]:
    """One row per setting (`hae eval`'s `setting_row`, with `n`: the prompts, as this file's
    rows have always named them), the full cache on the same items."""
    full = [r["settings"]["full"] for r in results]
    return [{**setting_row(s, [r["settings"][s.label] for r in results], full), "n": len(results)} for s in plan]


# --------------------------------------------------------------------------- VQA


def vqa_items(questions: list[tuple[int, object]], split: str) -> list[Item]:
    """Easy-VQA questions as `hae eval` items, grouped by image: a worker reads and encodes an
    image once for its questions."""
    from hae_testing.data import easyvqa

    ordered = sorted(questions, key=lambda pair: (pair[1].image_id, pair[0]))
    return [Item(str(index), (str(easyvqa.image_path(q.image_id, split)),), (Question(q.question, (q.answer,)),),
                 f"easy-VQA {split} question {index}") for index, q in ordered]


def run_vqa(questions: list[tuple[int, object]], plan: list[Setting], config: EvalConfig, args, loaded,
            known: dict[str, dict], tag: str) -> list[dict]:
    """Every question under every setting of `plan`: the rows, in `plan`'s order. A question
    whose result in `known` (results by id, updated here) has every setting is not run again."""
    todo = [(i, q) for i, q in questions if any(s.label not in known.get(str(i), {}).get("settings", {}) for s in plan)]
    known |= common.run_engine(vqa_items(todo, args.split), replace(config, plan=tuple(plan)), args, loaded, tag)
    rows = rows_of(plan, [known[str(index)] for index, _ in questions])
    # a one-word answer is right or wrong as a whole: its exact match is its accuracy
    return [{**row, "exact_match": row["accuracy"], "agree_with_full": row["same_as_full"]} for row in rows]


# --------------------------------------------------------------------------- stories

_CAPTION = re.compile(r"image\s*(\d+)\s*:\s*a\s+(\w+)\s+(\w+)")


def captions(text: str) -> dict[int, tuple[str, str]]:
    return {int(k): (color, shape) for k, color, shape in _CAPTION.findall(text.lower())}


def run_stories(image_sets: list[list[int]], plan: list[Setting], config: EvalConfig, args, loaded,
                tag: str) -> list[dict]:
    """Every caption set under every setting of `plan`, each decoding up to its target's length
    + 4 tokens; a setting's score on a set is the share of its images captioned right."""
    from hae_testing.data import easyvqa

    tokenizer = loaded.tokenizer
    targets = [tokenizer.encode(easyvqa.story_target(ids, args.split), add_special_tokens=False) for ids in image_sets]
    items = [Item(str(k), tuple(str(easyvqa.image_path(i, args.split)) for i in ids),
                  (Question(easyvqa.STORY_PROMPT),), f"caption set {k}") for k, ids in enumerate(image_sets)]
    results: dict[str, dict] = {}
    for length in sorted({len(t) for t in targets}):  # the engine decodes one length per run
        same = [item for item, target in zip(items, targets) if len(target) == length]
        results |= common.run_engine(same, replace(config, task="story", plan=tuple(plan), max_new_tokens=length + 4),
                              args, loaded, f"{tag} ({length} target tokens)")
    ordered = [results[str(k)] for k in range(len(image_sets))]
    exact: dict[str, list[bool]] = {s.label: [] for s in plan}
    for result, target in zip(ordered, targets):
        wanted = captions(tokenizer.decode(target, skip_special_tokens=True).strip())
        for label, answered in result["settings"].items():
            got = captions(answered["answers"][0])
            answered["scores"] = [sum(got.get(k) == v for k, v in wanted.items()) / max(1, len(wanted))]
            answered["metrics"] = ["captions"]
            exact[label].append(answered["token_ids"][0] == target)
    return [{**row, "exact_match": sum(exact[row["setting"]]) / len(ordered), "agree_with_full": row["agreement"]}
            for row in rows_of(plan, ordered)]


# --------------------------------------------------------------------------- output


VQA_COLUMNS = ("setting", "accuracy %", "drop vs full (pts)", "same answer as full %", "KV mean MiB", "KV peak MiB", "cut vs full %")
STORY_COLUMNS = (
    "setting",
    "caption acc %",
    "exact %",
    "drop (pts)",
    "tokens as full %",
    "same as full %",
    "KV mean MiB",
    "KV peak MiB",
    "cut %",
    "binned",
    "restored",
)


def vqa_table_rows(rows: list[dict]) -> list[list]:
    return [
        [
            r["setting"],
            100 * r["accuracy"],
            r["drop_points"],
            100 * r["same_as_full"],
            common.mib(r["kv_bytes_mean"]),
            common.mib(r["kv_bytes_peak"]),
            r["cut_pct"],
        ]
        for r in rows
    ]


def story_table_rows(rows: list[dict]) -> list[list]:
    return [
        [
            r["setting"],
            100 * r["accuracy"],
            100 * r["exact_match"],
            r["drop_points"],
            100 * r["agree_with_full"],
            100 * r["same_as_full"],
            common.mib(r["kv_bytes_mean"]),
            common.mib(r["kv_bytes_peak"]),
            r["cut_pct"],
            r["binned"],
            r["restored"],
        ]
        for r in rows
    ]


def plot(path: Path, vqa_rows: list[dict], stories: dict[int, list[dict]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # a captions-only run (`--limit 10 --baselines ""`) has no VQA comparison worth a panel
    show_vqa = not stories or len({r["policy"] for r in vqa_rows}) > 2
    panels = int(show_vqa) + len(stories)
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.8), squeeze=False)
    cells = iter(axes[0])
    if show_vqa:
        draw_curves(next(cells), vqa_rows, "easy-VQA (matched budgets)", "accuracy %", "accuracy")
    for ax, (n, rows) in zip(cells, sorted(stories.items())):
        draw_curves(ax, rows, f"captions, {n} images (decode budgets)", "full cache's output tokens reproduced %", "agree_with_full")
    fig.suptitle(textwrap.fill(title, width=int(15 * 6.5 * panels)), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="checkpoint: demo, a folder or a hub id (default: demo)")
    parser.add_argument("--split", default="test", help="easy-VQA split (default: test)")
    parser.add_argument("--limit", type=int, default=400, help="seeded questions for the all-policy table (0 = all; default 400)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the question subset and the story sets")
    parser.add_argument("--hae", default="thr,0.6,0.4,0.25", help="HAE settings: thr (thresholds) or a visual_keep; options as thr:r_g=1.5:r_i=0.1")
    parser.add_argument("--baselines", default=",".join(BASELINES), help=f"baselines at matched budgets (default: {','.join(BASELINES)})")
    parser.add_argument("--fastv-layer", type=int, default=2, help="FastV's K, the first layer without the dropped tokens (default 2)")
    parser.add_argument("--target-drop", type=float, default=0.3, help="accuracy drop (points) allowed when choosing the best HAE setting")
    parser.add_argument("--question-after", action="store_true", help="VQA: cache and compress each image before its question is fed (the question cannot steer eviction)")
    parser.add_argument("--no-full-split", action="store_true", help="skip full + best HAE on the whole split")
    parser.add_argument("--full-split-hae", default="best", help="HAE settings for the full-split pass: best (chosen on the subset) or --hae items")
    parser.add_argument("--full-split-limit", type=int, default=0, help="questions for the full-split pass (0 = the whole split)")
    parser.add_argument("--story-images", default="4,8", help="images per caption set (default 4,8)")
    parser.add_argument("--story-sets", type=int, default=10, help="seeded caption sets per size (default 10; 0 = skip)")
    parser.add_argument("--story-budgets", default="0.3,0.2", help="decode budgets, fractions of the prompt (default 0.3,0.2)")
    parser.add_argument("--story-buffer", type=int, default=8, help="HAE/mustdrop decoding buffer d for the caption task (default 8)")
    parser.add_argument("--story-hae", default="thr", help="HAE prefill setting for captions: a --hae item, or best (the chosen VQA setting); default thr")
    parser.add_argument("--story-prefills", default="0.4,0.6", help="more HAE prefill settings (--hae items) run on the captions with no decode budget (default 0.4,0.6; empty = none)")
    parser.add_argument("--workers", type=int, default=2, help="processes sharing the prompts, 1 thread each (default 2; 1 = in this process)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process (0 = torch's default; workers default to 1)")
    parser.add_argument("--out-dir", default=None, help="where to write accuracy.json / accuracy.png (default benchmarks/results)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--plot-only", metavar="JSON", help="redraw the PNG from a results file and exit")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.plot_only:
        return replot(Path(args.plot_only))
    from hae_cli.api import load_model
    from hae_testing.data import easyvqa

    started = time.perf_counter()
    common.set_threads(args.threads)
    cond = common.conditions(model=args.model, workers=args.workers)
    hae = hae_settings(args.hae)
    baselines = common.parse_list(args.baselines)
    unknown = sorted(set(baselines) - set(BASELINES))
    if unknown:
        raise SystemExit(f"unknown baseline {unknown[0]!r}; choose from {', '.join(BASELINES)}")
    plan = matched_plan(hae, baselines)
    everything = list(enumerate(easyvqa.load_split(args.split)))
    subset = common.seeded_subset(everything, args.limit or None, args.seed)
    out: dict = {"benchmark": "accuracy", "conditions": cond, "args": vars(args)}
    stories: dict[int, list[dict]] = {}

    loaded = load_model(args.model)  # answers --workers 1; tells the captions' target lengths
    config = EvalConfig(model=args.model, fastv_layer=args.fastv_layer, max_new_tokens=2,
                        question_after=args.question_after)
    known: dict[str, dict] = {}
    vqa_rows = run_vqa(subset, plan, config, args, loaded, known, "vqa subset")
    indices = [i for i, _ in subset]
    best = choose_best(vqa_rows, args.target_drop)
    comparison = equal_kv_comparison(vqa_rows, hae, baselines)
    out["vqa"] = {"questions": len(indices), "rows": vqa_rows, "best_hae": best["setting"], "equal_kv": comparison}
    protocol = QUESTION_AFTER_NOTE if args.question_after else ""
    title = f"easy-VQA {args.split}, {len(indices)} seeded questions (seed {args.seed}){protocol}, model {args.model}"
    common.print_table(title, VQA_COLUMNS, vqa_table_rows(vqa_rows), caption=common.describe_conditions(cond))
    print_comparison(comparison, baselines)

    best_setting = next(s for s in hae if s.label == best["setting"])
    if not args.no_full_split:
        chosen = [best_setting] if args.full_split_hae == "best" else hae_settings(args.full_split_hae)
        extra = common.seeded_subset(everything, args.full_split_limit or None, args.seed + 1)
        pool_questions = sorted({i: q for i, q in extra + subset}.items())
        split_rows = run_vqa(pool_questions, [plan[0], *chosen], config, args, loaded, known, "vqa full split")
        ids = [i for i, _ in pool_questions]
        out["vqa_full_split"] = {"questions": len(ids), "rows": split_rows}
        common.print_table(
            f"easy-VQA {args.split}, {len(ids)} questions: full vs HAE ({', '.join(s.label for s in chosen)})",
            VQA_COLUMNS,
            vqa_table_rows(split_rows),
        )

    if args.story_sets:
        story_hae = dict(best_setting.params) if args.story_hae == "best" else hae_settings(args.story_hae)[0].params
        story_settings = story_plan(
            story_hae, common.parse_list(args.story_budgets, float), args.story_buffer, hae_settings(args.story_prefills)
        )
        out["stories"] = {"hae_prefill_params": story_hae, "buffer": args.story_buffer, "by_images": {}}
        for n in common.parse_list(args.story_images, int):
            sets = easyvqa.story_sets(args.split, args.story_sets, n, seed=args.seed)
            rows = run_stories(sets, story_settings, config, args, loaded, f"captions x{n}")
            stories[n] = rows
            out["stories"]["by_images"][str(n)] = {"sets": len(sets), "rows": rows}
            common.print_table(
                f"captions: {len(sets)} seeded sets of {n} images; HAE prefill {story_hae or 'thresholds'}, "
                f"decode buffer d={args.story_buffer}, budgets B = fractions of the prompt",
                STORY_COLUMNS,
                story_table_rows(rows),
                caption="binned / restored: token moves summed over layers and rounds (from the cache's events)",
            )

    out["seconds"] = round(time.perf_counter() - started, 1)
    out["conditions"]["ended_with_training_running"] = bool(common.other_heavy_processes())
    path = common.write_json("accuracy_question_after" if args.question_after else "accuracy", out, args.out_dir)
    if not args.no_plot:
        png = path.with_suffix(".png")
        plot(png, vqa_rows, stories, plot_title(args.model, args.question_after, cond))
        out["plot"] = str(png)
    print(f"wrote {path} in {out['seconds']} s")
    return out


def plot_title(model: str, question_after: bool, conditions: dict) -> str:
    protocol = QUESTION_AFTER_NOTE if question_after else ""
    return f"{model}{protocol}; {common.describe_conditions(conditions)}"


def replot(path: Path) -> dict:
    data = json.loads(path.read_text())
    stories = {int(n): v["rows"] for n, v in data.get("stories", {}).get("by_images", {}).items()}
    png = path.with_suffix(".png")
    title = plot_title(data["conditions"]["model"], data["args"].get("question_after", False), data["conditions"])
    plot(png, data["vqa"]["rows"], stories, title)
    print(f"wrote {png}")
    return data


def print_comparison(comparison: list[dict], baselines: list[str]) -> None:
    columns, rows = equal_kv_table(comparison, baselines)
    common.print_table("accuracy % at HAE's KV bytes", columns, rows, caption=EQUAL_KV_CAPTION)


if __name__ == "__main__":
    main()
