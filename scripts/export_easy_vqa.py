"""Export easy-VQA questions as `hae eval`'s JSONL: one record per question, its image copied
beside the file.

    python scripts/export_easy_vqa.py data/easyvqa                   # the whole test split, 9,673 questions
    python scripts/export_easy_vqa.py data/easyvqa --limit 400       # the 400 that benchmarks/accuracy.py runs
    hae eval data/easyvqa/easyvqa_test_400.jsonl -n 2 --out runs/easyvqa_400

With `--limit N` the questions are those `benchmarks/accuracy.py --limit N --seed S` draws
(its seeded subset, in the split's order), so the two can be compared on the same questions.
A record: {"id": "test-1234", "image": "images/test_0123.png", "question": ..., "answer": ...};
the id is the question's index in the split.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))


def export(out: Path, split: str = "test", limit: int | None = None, seed: int = 0) -> Path:
    """Write the JSONL (and the images it names) into `out`; the JSONL's path."""
    from _common import seeded_subset  # benchmarks/accuracy.py's draw of its questions

    from hae_testing.data import easyvqa

    questions = seeded_subset(list(enumerate(easyvqa.load_split(split))), limit, seed)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    path = out / (f"easyvqa_{split}_{limit}.jsonl" if limit else f"easyvqa_{split}.jsonl")
    with path.open("w", encoding="utf-8") as file:
        for index, question in questions:
            name = f"{split}_{question.image_id:04d}.png"
            if not (images / name).exists():
                shutil.copyfile(easyvqa.image_path(question.image_id, split), images / name)
            record = {"id": f"{split}-{index}", "image": f"images/{name}", "question": question.question,
                      "answer": question.answer}
            file.write(json.dumps(record) + "\n")
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for the JSONL and its images/")
    parser.add_argument("--split", default="test", choices=("train", "test"), help="easy-VQA split (default: test)")
    parser.add_argument("--limit", type=int, default=0, help="the N seeded questions benchmarks/accuracy.py "
                                                             "--limit N runs (default 0: every question)")
    parser.add_argument("--seed", type=int, default=0, help="the seed of that draw (accuracy.py's --seed; default 0)")
    args = parser.parse_args(argv)
    path = export(args.out, args.split, args.limit or None, args.seed)
    count = sum(1 for _ in path.open(encoding="utf-8"))
    print(f"wrote {count:,} questions to {path} ({len(list((args.out / 'images').iterdir())):,} images)")


if __name__ == "__main__":
    main()
