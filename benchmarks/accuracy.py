"""Accuracy against KV bytes: easy-VQA and multi-image captions on the demo model, every policy.

Every question is answered under `full`, under each HAE setting, and under each baseline
given the budget that matches that HAE setting's kept size *on the same question*
(snapkv / h2o / streaming: HAE's tokens per layer after prefill; mustdrop: its dual-attention
filter keeping as many image tokens as HAE kept, the top by g_j; fastv: the same share of
image tokens dropped, after its layer K).
The full cache is measured in the same run, so every ratio is a ratio of two measurements.
The settings, the matching rule and the equal-KV verdicts are `hae_cli.evaluation.matching`'s,
the one copy `benchmarks/conversation.py` and `hae eval` also run.

Each image goes through the vision tower once; its features are reused for all of its
questions and all policies (the tower's output depends on neither), through
`model.embed(..., image_features)` and `api.run_prepared`.

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
import statistics
import sys
import textwrap
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

import torch  # noqa: E402

from hae_cli.evaluation import matching  # noqa: E402
from hae_cli.evaluation.matching import (  # noqa: E402
    BASELINES, Setting, choose_best, equal_kv_comparison, hae_settings, matched_plan, story_plan,
)
from hae_cli.evaluation.metrics import agreement  # noqa: E402
from hae_cli.evaluation.plot import POLICY_STYLES, draw_curves  # noqa: E402,F401  (conversation.py draws with the styles)
from hae_cli.evaluation.runner import run_prompt  # noqa: E402
from hae_cli.evaluation.summary import EQUAL_KV_CAPTION, equal_kv_table  # noqa: E402
from hae_cli.model.interface import UserTurn  # noqa: E402

QUESTION_AFTER_NOTE = ", questions fed after the compressed images"  # in table and plot titles


# --------------------------------------------------------------------------- running prompts


def image_features(loaded, processed) -> torch.Tensor:
    with torch.inference_mode():
        return loaded.image_features([processed])[0]


@dataclass
class Record:
    """A prompt's result under one setting: what the table and the JSON aggregate."""

    correct: float  # 1/0 for VQA; share of images captioned right for stories
    kv_mean: float
    kv_peak: int
    full_mean: float
    exact: bool = False
    agree: float = 1.0  # VQA: same answer as the full cache; stories: share of the full cache's tokens reproduced
    same_as_full: bool = True
    restored: int = 0
    binned: int = 0


def summarize(setting: Setting, records: list[Record], full: list[Record]) -> dict:
    """One table row; `full` is the full cache on the same prompts (same run)."""
    n = len(records)
    accuracy = sum(r.correct for r in records) / n
    full_accuracy = sum(r.correct for r in full) / n
    kv_mean = statistics.fmean(r.kv_mean for r in records)
    full_mean = statistics.fmean(r.kv_mean for r in full)
    return {
        **setting.row_head(),
        "n": n,
        "accuracy": accuracy,
        "drop_points": 100 * (full_accuracy - accuracy),
        "kv_bytes_mean": kv_mean,
        "kv_bytes_peak": statistics.fmean(r.kv_peak for r in records),
        "cut_pct": 100 * (1 - kv_mean / full_mean),
        "exact_match": sum(r.exact for r in records) / n,
        "agree_with_full": statistics.fmean(r.agree for r in records),
        "same_as_full": sum(r.same_as_full for r in records) / n,
        "restored": sum(r.restored for r in records),
        "binned": sum(r.binned for r in records),
    }


class Workbench:
    """The model plus per-image caches: preprocessed pixels and vision features, computed once."""

    def __init__(self, loaded, split: str) -> None:
        from hae_testing.data import easyvqa

        self.loaded, self.split, self.easyvqa = loaded, split, easyvqa
        self.tokenizer = loaded.tokenizer
        self._images: dict[int, tuple] = {}
        self.vision_calls = 0

    def image(self, image_id: int):
        """(processed image, its features); keeps the last few hundred."""
        if image_id not in self._images:
            if len(self._images) > 512:
                self._images.pop(next(iter(self._images)))
            processed = self.loaded.read_image(self.easyvqa.image_path(image_id, self.split))
            self._images[image_id] = (processed, image_features(self.loaded, processed))
            self.vision_calls += 1
        return self._images[image_id]

    def prompt(self, turn, image_ids: list[int]):
        """The prompt of a user turn (`UserTurn`), embedded with the cached image features (no
        vision-tower pass)."""
        from hae_cli.api import PreparedPrompt

        pairs = [self.image(i) for i in image_ids]
        processed = [p for p, _ in pairs]
        tokens = self.loaded.prompt(turn, processed)
        with torch.inference_mode():
            embeds = self.loaded.embed(tokens, processed, [f for _, f in pairs])
        return PreparedPrompt(tokens, embeds)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


# --------------------------------------------------------------------------- VQA


def vqa_question(question, plan: list[Setting], fastv_layer: int, question_after: bool = False) -> dict[str, Record]:
    """One question under every setting of `plan` (baselines after the HAE setting they match)."""
    bench = _BENCH
    prepared = bench.prompt(UserTurn(question.question, 1), [question.image_id])
    context = prepared.tokens.after_images() if question_after else None
    fed_later = prepared.embeds.shape[1] - context if question_after else 0
    outcomes = matching.run_plan(
        plan, lambda setting, params: run_prompt(bench.loaded, prepared, setting.policy, params, max_new_tokens=2,
                                                 context_length=context),
        prepared.tokens, fastv_layer, fed_later)
    records: dict[str, Record] = {}
    for setting in plan:
        outcome = outcomes[setting.label]
        correct = bench.decode(outcome.token_ids) == question.answer
        same = outcome.token_ids == outcomes[plan[0].label].token_ids
        records[setting.label] = Record(
            float(correct),
            outcome.kv_mean,
            outcome.kv_peak,
            statistics.fmean(outcome.full_bytes_per_step),
            exact=correct,
            agree=float(same),
            same_as_full=same,
        )
    return records


def _vqa_group(task) -> list[tuple[int, dict[str, Record]]]:
    group, plan, fastv_layer, question_after = task
    return [(index, vqa_question(question, plan, fastv_layer, question_after)) for index, question in group]


def run_vqa(questions: list[tuple[int, object]], plan: list[Setting], results: dict, pool, args, tag: str) -> None:
    """Fill `results[label][question index]` for `plan`, skipping questions already run with all of it.

    Questions are grouped by image, so each image goes through the vision tower once."""
    todo = [(i, q) for i, q in questions if any(i not in results[s.label] for s in plan)]
    groups: dict[int, list] = defaultdict(list)
    for index, question in todo:
        groups[question.image_id].append((index, question))
    tasks = [(group, plan, args.fastv_layer, args.question_after) for _, group in sorted(groups.items())]
    progress = common.Progress(tag, len(todo), quiet=args.quiet)
    done = 0
    for answered in pool.imap_unordered(_vqa_group, tasks):
        for index, records in answered:
            for label, record in records.items():
                results[label][index] = record
        done += len(answered)
        progress.update(done)


# --------------------------------------------------------------------------- stories

_CAPTION = re.compile(r"image\s*(\d+)\s*:\s*a\s+(\w+)\s+(\w+)")


def captions(text: str) -> dict[int, tuple[str, str]]:
    return {int(k): (color, shape) for k, color, shape in _CAPTION.findall(text.lower())}


def story_set(task) -> dict[str, Record]:
    """One caption set under every setting of `plan`."""
    image_ids, plan = task
    bench = _BENCH
    easyvqa = bench.easyvqa
    target_ids = bench.tokenizer.encode(easyvqa.story_target(list(image_ids), bench.split), add_special_tokens=False)
    wanted = captions(bench.decode(target_ids))
    prepared = bench.prompt(UserTurn(easyvqa.STORY_PROMPT, len(image_ids), labelled=True), list(image_ids))
    records = {}
    full_ids: list[int] | None = None
    for setting in plan:
        outcome = run_prompt(bench.loaded, prepared, setting.policy, setting.params, len(target_ids) + 4)
        full_ids = outcome.token_ids if full_ids is None else full_ids  # plan[0] is the full cache
        got = captions(bench.decode(outcome.token_ids))
        records[setting.label] = Record(
            sum(got.get(k) == v for k, v in wanted.items()) / max(1, len(wanted)),
            outcome.kv_mean,
            outcome.kv_peak,
            statistics.fmean(outcome.full_bytes_per_step),
            exact=outcome.token_ids == target_ids,
            agree=agreement(outcome.token_ids, full_ids),
            same_as_full=outcome.token_ids == full_ids,
            restored=outcome.restored,
            binned=outcome.binned,
        )
    return records


def run_stories(image_sets: list[list[int]], plan: list[Setting], pool, args, tag: str) -> dict[str, list[Record]]:
    results: dict[str, list[Record]] = defaultdict(list)
    progress = common.Progress(tag, len(image_sets), quiet=args.quiet)
    for done, records in enumerate(pool.imap_unordered(story_set, [(ids, plan) for ids in image_sets]), start=1):
        for label, record in records.items():
            results[label].append(record)
        progress.update(done)
    return results


# --------------------------------------------------------------------------- workers

_BENCH: Workbench | None = None


def workbench() -> Workbench:
    """This process's workbench (`make_pool` starts one in each worker), for other benchmarks' tasks."""
    return _BENCH


def _start_worker(model: str, split: str, threads: int) -> None:
    global _BENCH
    common.set_threads(threads)
    from hae_cli.api import load_model

    _BENCH = Workbench(load_model(model), split)


class InProcess:
    """The pool interface for --workers 1: no processes, same code path."""

    def __init__(self, model: str, split: str, threads: int) -> None:
        _start_worker(model, split, threads)

    def imap_unordered(self, fn, tasks):
        return map(fn, tasks)

    def vision_calls(self) -> int:
        return _BENCH.vision_calls

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def make_pool(args):
    if args.workers <= 1:
        return InProcess(args.model, args.split, args.threads)
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # no fork after torch has started threads
    return context.Pool(args.workers, initializer=_start_worker, initargs=(args.model, args.split, args.threads or 1))


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

    with make_pool(args) as pool:
        results: dict[str, dict[int, Record]] = defaultdict(dict)
        run_vqa(subset, plan, results, pool, args, "vqa subset")
        indices = [i for i, _ in subset]
        full_records = [results["full"][i] for i in indices]
        vqa_rows = [summarize(s, [results[s.label][i] for i in indices], full_records) for s in plan]
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
            run_vqa(pool_questions, [plan[0], *chosen], results, pool, args, "vqa full split")
            ids = [i for i, _ in pool_questions]
            full = [results["full"][i] for i in ids]
            split_rows = [summarize(s, [results[s.label][i] for i in ids], full) for s in (plan[0], *chosen)]
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
                records = run_stories(sets, story_settings, pool, args, f"captions x{n}")
                rows = [summarize(s, records[s.label], records["full"]) for s in story_settings]
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
