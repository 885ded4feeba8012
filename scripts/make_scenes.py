"""Write seeded scenes as `hae eval`'s JSONL: DIR/data.jsonl and DIR/images/.

    python scripts/make_scenes.py --seed 2 --out runs/scenes_ask --items 300             # 1 image, 4 crops
    python scripts/make_scenes.py --seed 2 --out runs/scenes_chat --items 100 --task chat --images 2-4
    python scripts/make_scenes.py --seed 2 --out runs/scenes_story --items 50 --task story
    hae eval runs/scenes_ask/data.jsonl --model scenes --out runs/eval_ask

Each image holds several objects (shape, colour, size) with a small digit on each, readable in
Phi-3.5-V's crops and not in its global view (`hae_cli/scenes/world.py`). Each record has the
question's type (`type`: color, shape, label, count, exist, spatial; per turn in chat). Seeds:
the scenes model trains on 2468 and 2469 (`scripts/train_scenes_model.py`), the benchmarks tune
on seed 1 and report on seed 2. The same seed gives the same bytes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hae_cli.scenes import CROP_CHOICES, TASKS, write_jsonl


def span(text: str) -> tuple[int, int]:
    """"3" -> (3, 3); "2-4" -> (2, 4)."""
    low, _, high = text.partition("-")
    try:
        low_n, high_n = int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN-MAX, got {text!r}") from None
    if not 1 <= low_n <= high_n:
        raise argparse.ArgumentTypeError(f"expected 1 <= MIN <= MAX, got {text!r}")
    return low_n, high_n


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, required=True, help="the stream the items are drawn from")
    parser.add_argument("--out", type=Path, required=True, help="folder for data.jsonl and images/")
    parser.add_argument("--items", type=positive, required=True, help="how many records")
    parser.add_argument("--task", choices=TASKS, default="ask", help="ask (one question), chat (3-6 turns), "
                                                                      "story (a caption of every object)")
    parser.add_argument("--images", type=span, default=None, help="images per item, N or MIN-MAX "
                                                                   "(default: ask 1, chat 2-4, story 4)")
    parser.add_argument("--objects", type=span, default=None, help="objects per image, N or MIN-MAX "
                                                                    "(default: 3-12; story 3-6)")
    parser.add_argument("--crops", type=int, choices=CROP_CHOICES, default=4,
                        help="Phi-3.5-V crops per image: 672x672 px for 4, 1344x1344 for 16")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file, not a folder")
    try:
        path = write_jsonl(args.out, args.seed, args.items, args.task, args.crops, args.images, args.objects,
                           on_item=lambda n: print(f"\r{n}/{args.items} items", end="", file=sys.stderr, flush=True))
    except ValueError as error:  # scenes that cannot be drawn: said before anything is written
        parser.error(str(error))
    print(f"\nwrote {args.items} {args.task} items to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
