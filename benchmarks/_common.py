"""What every benchmark shares: the run's conditions, the JSON file, the table, a seeded subset.

Every figure a benchmark prints is measured in the run that prints it; `conditions()` records
what else the machine was doing, so a timing taken under load says so.
"""

from __future__ import annotations

import json
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
if str(REPO) not in sys.path:  # `python benchmarks/x.py` from anywhere finds hae_cli
    sys.path.insert(0, str(REPO))

from hae_cli.evaluation.matching import parse_list, parse_params  # noqa: E402,F401 (after the path fix above; for every benchmark)


def other_heavy_processes() -> list[str]:
    """Command lines of other processes known to load the CPU (the demo model's training)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if "train_demo_model" in cmdline:
            found.append(cmdline)
    return found


def conditions(**extra) -> dict:
    """When, where and under which load this run measured."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    heavy = other_heavy_processes()
    return {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "git_commit": commit,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": round(load[0], 2),
        "demo_training_running": bool(heavy),
        **extra,
    }


def describe_conditions(cond: dict) -> str:
    training = "WHILE the demo model was training (timings distorted)" if cond["demo_training_running"] else "no training running"
    return (
        f"{cond['started']}, commit {cond['git_commit'] or '?'}, {cond['device']}, "
        f"{cond['torch_threads']} torch threads of {cond['cpu_count']} cores, load {cond['load_average_1m']}, {training}"
    )


def write_json(name: str, data: dict, out_dir: str | Path | None = None) -> Path:
    folder = Path(out_dir) if out_dir else RESULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]], caption: str = "") -> None:
    """A Rich table on stdout (plain text when stdout is not a terminal)."""
    from rich.console import Console

    from hae_cli.evaluation.summary import rich_table

    table = rich_table(title, columns, rows, caption)
    Console(width=max(100, sum(len(c) for c in columns) + 8 * len(columns))).print(table)


def seeded_subset(items: Sequence, limit: int | None, seed: int) -> list:
    """`limit` items drawn without replacement with `seed`, in their original order (all if None)."""
    if limit is None or limit >= len(items):
        return list(items)
    chosen = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in chosen]


def mib(n_bytes: float) -> float:
    return n_bytes / 2**20


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


class Progress:
    """One line to stderr every `every` seconds: done / total and the time left."""

    def __init__(self, label: str, total: int, every: float = 10.0, quiet: bool = False) -> None:
        self.label, self.total, self.every, self.quiet = label, total, every, quiet
        self.start = self.last = time.perf_counter()

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if self.quiet or (now - self.last < self.every and done < self.total):
            return
        self.last = now
        elapsed = now - self.start
        left = elapsed / done * (self.total - done) if done else float("nan")
        print(f"  {self.label}: {done}/{self.total}  {elapsed:.0f} s, ~{left:.0f} s left", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- hae eval's engine


def run_engine(items: list, config, args, loaded, tag: str) -> dict[str, dict]:
    """Each `hae eval` item's result (`ItemRunner.run` under the `EvalConfig`), by id: in this process with `loaded` (--workers 1),
    or in --workers spawned processes at --threads (1 unless given) each."""
    from hae_cli.evaluation.parallel import Backend, run_items

    backend = Backend(1, args.threads) if args.workers <= 1 else Backend(args.workers, args.threads or 1)
    progress = Progress(tag, len(items), quiet=args.quiet)
    results = {}
    for result in run_items(items, config, backend, loaded=loaded if args.workers <= 1 else None):
        if "error" in result:
            raise SystemExit(f"{tag}: {result['error']}")
        results[result["id"]] = result
        progress.update(len(results))
    return results


# --------------------------------------------------------------------------- battery workers


class Workbench:
    """A loaded model and its easy-VQA images read and through the vision tower once each (the
    tower's output depends on no policy): what `battery.py` feeds a `Conversation` that it
    resets and adds images to, which `hae eval`'s engine does not do."""

    IMAGES_KEPT = 512

    def __init__(self, loaded, split: str) -> None:
        self.loaded, self.split = loaded, split
        self._images: dict[int, tuple] = {}

    def image(self, image_id: int):
        """(the image as the model read it, its features); keeps the last few hundred."""
        from hae_testing.data import easyvqa

        if image_id not in self._images:
            if len(self._images) > self.IMAGES_KEPT:
                self._images.pop(next(iter(self._images)))
            processed = self.loaded.read_image(easyvqa.image_path(image_id, self.split))
            with torch.inference_mode():
                self._images[image_id] = (processed, self.loaded.image_features([processed])[0])
        return self._images[image_id]


_BENCH: Workbench | None = None


def workbench() -> Workbench:
    """This process's workbench (`make_pool` starts one in each worker)."""
    return _BENCH


def _start_worker(model: str, split: str, threads: int) -> None:
    global _BENCH
    set_threads(threads)
    from hae_cli.api import load_model

    _BENCH = Workbench(load_model(model), split)


class InProcess:
    """The pool interface for --workers 1: no processes, same code path."""

    def __init__(self, model: str, split: str, threads: int) -> None:
        _start_worker(model, split, threads)

    def imap_unordered(self, fn, tasks):
        return map(fn, tasks)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def make_pool(args):
    """--workers spawned processes (no fork after torch has started threads), a workbench each,
    at --threads (1 unless given); or this process for --workers 1."""
    if args.workers <= 1:
        return InProcess(args.model, args.split, args.threads)
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    return context.Pool(args.workers, initializer=_start_worker, initargs=(args.model, args.split, args.threads or 1))
