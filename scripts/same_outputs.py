"""Record, then compare, what every policy generates and holds: the check that a refactor
changed no behaviour.

`record` runs seeded four-image caption sets (`hae story`) and seeded conversations
(`hae chat`) under a fixed matrix of policies through the public API only (`api.load_model`,
`api.run`, `Conversation`), so the same script runs on the commits before and after a change,
and writes one JSON row per (workload, setting): the generated ids and, after every step,
the KV bytes held and allocated, the tokens held per layer and modality, and the events.
`compare` reads two such files and prints every row that differs, or that none does.

    python scripts/same_outputs.py record before.json --caption-sets 100 --conversations 10
    python scripts/same_outputs.py record after.json --caption-sets 100 --conversations 10
    python scripts/same_outputs.py compare before.json after.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

SETTINGS = {
    "full": ("full", {}),
    "hae": ("hae", {}),
    "hae B=0.25 d=8": ("hae", {"budget": 0.25, "buffer": 8}),
    "hae broadcast B=0.25 d=8": ("hae", {"budget": 0.25, "buffer": 8, "broadcast": True}),
    "mustdrop B=0.3": ("mustdrop", {"budget": 0.3, "buffer": 8}),
    "h2o B=0.3": ("h2o", {"budget": 0.3}),
    "streaming B=0.3": ("streaming", {"budget": 0.3}),
    "snapkv B=0.3": ("snapkv", {"budget": 0.3}),
    "fastv": ("fastv", {}),
}


def step_row(stats) -> dict:
    return {
        "step": stats.step,
        "held": stats.bytes_held,
        "allocated": stats.bytes_allocated,
        "full": stats.full_cache_bytes,
        "bin": stats.bin_bytes,
        "tokens": [layer.tokens_held for layer in stats.layers],
        "by_modality": [layer.tokens_by_modality for layer in stats.layers],
        "by_image": [layer.tokens_by_image for layer in stats.layers],
        "bin_by_image": [layer.bin_by_image for layer in stats.layers],
        "events": [asdict(e) for e in stats.events],
    }


def record(path: Path, caption_sets: int, conversations: int, max_new_tokens: int) -> None:
    from hae_cli import api
    from hae_cli.conversation import Conversation
    from hae_testing.data import easyvqa
    try:
        from hae_testing.data.conversation_sets import conversation_sets
    except ImportError:  # before the module was renamed
        from hae_testing.data.conversations import conversation_sets

    loaded = api.load_model("demo")
    rows = []
    started = time.perf_counter()
    for number, image_ids in enumerate(easyvqa.story_sets("test", caption_sets, 4, seed=0)):
        paths = [easyvqa.image_path(i, "test") for i in image_ids]
        for label, (policy, params) in SETTINGS.items():
            result = api.run(loaded, paths, None, task="story", policy=policy, policy_params=params,
                             max_new_tokens=max_new_tokens)
            rows.append({"workload": f"captions {number}", "setting": label, "token_ids": result.token_ids,
                         "steps": [step_row(s) for s in result.steps]})
        print(f"captions {number + 1}/{caption_sets} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    for size in (4, 8):
        for number, (image_ids, turns) in enumerate(conversation_sets("test", conversations, size, seed=size)):
            paths = [easyvqa.image_path(i, "test") for i in image_ids]
            for label, (policy, params) in SETTINGS.items():
                chat = Conversation(loaded, paths, policy=policy, policy_params=params, max_new_tokens=8)
                answers = [chat.ask(turn.question) for turn in turns]
                rows.append({
                    "workload": f"conversation {size}x{number}", "setting": label,
                    "prefill": step_row(chat.prefill_stats),
                    "turns": [{"token_ids": t.result.token_ids, "steps": [step_row(s) for s in t.result.steps]}
                              for t in answers],
                })
            print(f"conversations of {size}: {number + 1}/{conversations} ({time.perf_counter() - started:.0f} s)",
                  file=sys.stderr)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    path.write_text(json.dumps({"commit": commit, "rows": rows}))
    print(f"{len(rows)} rows written to {path} in {time.perf_counter() - started:.0f} s", file=sys.stderr)


def compare(before: Path, after: Path) -> int:
    old, new = json.loads(before.read_text()), json.loads(after.read_text())
    keyed = {(r["workload"], r["setting"]): r for r in new["rows"]}
    differing = [key for r in old["rows"] if keyed.get(key := (r["workload"], r["setting"])) != r]
    extra = len(keyed) - len(old["rows"])
    print(f"{before} (commit {old['commit']}) vs {after} (commit {new['commit']}): "
          f"{len(old['rows'])} rows, {len(old['rows']) - len(differing)} identical, {len(differing)} differ"
          + (f", {extra} rows only in {after}" if extra else ""))
    for workload, setting in differing[:20]:
        print(f"  differs: {workload} / {setting}")
    return 1 if differing or extra else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="run the matrix and write the rows")
    rec.add_argument("out", type=Path)
    rec.add_argument("--caption-sets", type=int, default=100)
    rec.add_argument("--conversations", type=int, default=10, help="per size (4 and 8 images)")
    rec.add_argument("--max-new-tokens", type=int, default=48)
    cmp_ = sub.add_parser("compare", help="compare two recorded files row for row")
    cmp_.add_argument("before", type=Path)
    cmp_.add_argument("after", type=Path)
    args = parser.parse_args()
    if args.command == "record":
        import torch

        torch.set_num_threads(1)
        record(args.out, args.caption_sets, args.conversations, args.max_new_tokens)
        return 0
    return compare(args.before, args.after)


if __name__ == "__main__":
    sys.exit(main())
