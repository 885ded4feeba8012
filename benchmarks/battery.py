"""The conversation battery: does the model answer every easy-VQA wording addressed to an image,
at every image position, in every turn 1-6, with 2-8 images, and after /reset and /images?

`hae_testing.data.conversation_sets.battery` builds the cases (seeded, one per wording x image
count x position x turn, plus one after a /reset and one about an image added with /images per
wording and count); each runs as a `Conversation` under `--policy` (default: the full cache,
which measures the model, not the cache). The question under test is each case's last; the
turns before it are scored too, apart.

    python benchmarks/battery.py                      # test split, full cache, 2 workers
    python benchmarks/battery.py --split train --limit 500 --policy hae

Writes benchmarks/results/battery.json (or `--out-dir`): overall, and per wording, turn, image
count, position and kind, with every miss.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402  (also the worker pool and per-image workbench)


def run_case(task) -> dict:
    """One battery case: its answers and which were right."""
    from hae_cli.conversation import Conversation

    case, policy, params = task
    bench = common.workbench()
    first = case.images[:-1] if case.kind == "added" else case.images
    pairs = [bench.image(i) for i in first]
    conversation = Conversation(bench.loaded, [p for p, _ in pairs], image_features=[f for _, f in pairs],
                                policy=policy, policy_params=params, max_new_tokens=3)
    answers = []
    for number, turn in enumerate(case.turns, start=1):
        last = number == len(case.turns)
        if last and case.kind == "reset":
            conversation.reset()
        if last and case.kind == "added":
            image, features = bench.image(case.images[-1])
            conversation.add_images([image], [features])
        answers.append(conversation.ask(turn.question).result.text)
    return {"answers": answers, "right": [a == t.answer for a, t in zip(answers, case.turns)]}


def summarize(cases, results) -> dict:
    groups = {key: defaultdict(list) for key in ("wording", "turn", "images", "position", "kind")}
    misses, fillers = [], []
    for case, result in zip(cases, results):
        ok = result["right"][-1]
        for key, value in (("wording", case.wording), ("turn", case.turn), ("images", len(case.images)),
                           ("position", case.position), ("kind", case.kind)):
            groups[key][value].append(ok)
        fillers += result["right"][:-1]
        if not ok:
            misses.append({"images": list(case.images), "kind": case.kind, "turn": case.turn,
                           "questions": [t.question for t in case.turns], "expected": case.turns[-1].answer,
                           "answers": result["answers"]})
    targets = [r["right"][-1] for r in results]
    return {
        "cases": len(cases),
        "accuracy": sum(targets) / len(targets),
        "filler_questions": len(fillers),
        "filler_accuracy": sum(fillers) / len(fillers) if fillers else None,
        **{f"by_{key}": {str(k): {"accuracy": sum(v) / len(v), "questions": len(v)} for k, v in sorted(group.items())}
           for key, group in groups.items()},
        "misses": misses,
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="checkpoint (default: demo)")
    parser.add_argument("--split", default="test", help="easy-VQA split (default test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=0, help="run only a seeded subset of this many cases (0 = all)")
    parser.add_argument("--policy", default="full", help="cache policy (default full: measures the model)")
    parser.add_argument("--params", default="", help="policy parameters, e.g. budget=0.3")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from hae_testing.data.conversation_sets import battery

    started = time.perf_counter()
    cond = common.conditions(model=args.model, workers=args.workers)
    cases = battery(args.split, args.seed)
    if args.limit:
        cases = [cases[i] for i in sorted(common.seeded_subset(list(range(len(cases))), args.limit, args.seed))]
    params = common.parse_params(args.params)
    tasks = [(case, args.policy, params) for case in cases]
    results: list[dict | None] = [None] * len(tasks)
    progress = common.Progress(f"battery ({args.policy})", len(tasks), quiet=args.quiet)
    with common.make_pool(args) as pool:
        for done, (index, result) in enumerate(pool.imap_unordered(_indexed, list(enumerate(tasks))), start=1):
            results[index] = result
            progress.update(done)
    out = {"benchmark": "battery", "conditions": cond, "args": vars(args), **summarize(cases, results),
           "seconds": round(time.perf_counter() - started, 1)}
    below = {key: {k: v for k, v in out[f"by_{key}"].items() if v["accuracy"] < 0.99}
             for key in ("wording", "turn", "images", "position", "kind")}
    print(f"battery on {args.split}, {len(cases)} cases, policy {args.policy}: {100 * out['accuracy']:.2f}% of the "
          f"questions under test right ({100 * (out['filler_accuracy'] or 0):.2f}% of the {out['filler_questions']} "
          f"before them)")
    for key, groups in below.items():
        for name, value in groups.items():
            print(f"  under 99%: {key} {name}: {100 * value['accuracy']:.1f}% of {value['questions']}")
    path = common.write_json("battery" if args.policy == "full" else f"battery_{args.policy}", out, args.out_dir)
    print(f"wrote {path} in {out['seconds']} s")
    return out


def _indexed(item):
    index, task = item
    return index, run_case(task)


if __name__ == "__main__":
    main()
