"""Put `hae eval`'s summary beside `benchmarks/accuracy.py`'s VQA table, setting by setting: the
check that the library's evaluation and the benchmark measure the same thing.

    python scripts/export_easy_vqa.py data/easyvqa --limit 400
    python benchmarks/accuracy.py --limit 400 --no-full-split --story-sets 0 --workers 1 --threads 1 --out-dir runs/bench
    hae eval data/easyvqa/easyvqa_test_400.jsonl -n 2 --out runs/eval
    python scripts/eval_vs_accuracy.py runs/bench/accuracy.json runs/eval/summary.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MEASURES = (("accuracy", "accuracy %", 100), ("same_as_full", "same as full %", 100),
            ("kv_bytes_mean", "KV mean B", 1), ("kv_bytes_peak", "KV peak B", 1), ("cut_pct", "cut %", 1))


def compare(bench: dict, summary: dict) -> tuple[list[list], bool]:
    """Rows of (setting, each measure from both, equal?) and whether every one is equal."""
    ours = {row["setting"]: row for row in summary["rows"]}
    rows, all_equal = [], bench["vqa"]["questions"] == summary["data"]["answered"]
    for row in bench["vqa"]["rows"]:
        mine = ours.get(row["setting"])
        cells = [row["setting"]]
        same = mine is not None
        for key, _, scale in MEASURES:
            theirs = scale * row[key]
            cells += [theirs, None if mine is None else scale * mine[key]]
            same = same and mine[key] == row[key]
        rows.append(cells + ["yes" if same else "NO"])
        all_equal &= same
    return rows, all_equal and len(ours) == len(bench["vqa"]["rows"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("accuracy_json", type=Path, help="benchmarks/accuracy.py's accuracy.json")
    parser.add_argument("summary_json", type=Path, help="hae eval's OUT/summary.json")
    args = parser.parse_args(argv)
    bench, summary = json.loads(args.accuracy_json.read_text()), json.loads(args.summary_json.read_text())
    rows, equal = compare(bench, summary)
    header = ["setting"] + [f"{name} ({who})" for _, name, _ in MEASURES for who in ("accuracy.py", "hae eval")]
    print("| " + " | ".join(header + ["equal"]) + " |")
    print("|" + " --- |" * (len(header) + 1))
    for row in rows:
        print("| " + " | ".join(f"{v:,.2f}" if isinstance(v, float) else str(v) for v in row) + " |")
    print(f"\n{bench['vqa']['questions']} questions (accuracy.py) / {summary['data']['answered']} items (hae eval); "
          f"every measure of every setting equal to the last bit: {'yes' if equal else 'NO'}; "
          f"equal-KV verdicts identical: {'yes' if bench['vqa']['equal_kv'] == summary['equal_kv'] else 'NO'}")


if __name__ == "__main__":
    main()
