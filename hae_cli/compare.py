"""Run one workload under the full cache and other policies, and compare them.

The library half of `hae profile`, usable from Python:

    from hae_cli.api import load_model
    from hae_cli.compare import read_workload, run_profile, sample_folder

    loaded = load_model("demo")
    report = run_profile(loaded, read_workload(sample_folder()), [("hae", {}), ("snapkv", {"budget": 0.5})])
    for row in report.rows:
        print(row.name, row.kv_bytes_final, row.token_match_percent)
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hae_cli.cache.modality import MODALITY_NAMES
from hae_cli.cache.stats import CacheStats
from hae_cli.errors import InputError
from hae_cli.user_text import checked_text

BASELINE = "baseline"  # the name a profile gives the full cache
FULL_POLICY = "full"
MODALITIES = tuple(MODALITY_NAMES.values())


@dataclass(frozen=True)
class Prompt:
    task: str  # "ask" or "story"
    images: tuple[Path, ...]
    question: str | None
    answer: str | None = None  # expected answer, when the workload knows it

    def label(self) -> str:
        return ", ".join(p.name for p in self.images)

    def to_json(self) -> dict:
        return {"task": self.task, "images": [str(p) for p in self.images], "question": self.question, "answer": self.answer}


def sample_folder() -> Path:
    """`sample_images/` in the working directory, else the one beside the package."""
    for candidate in (Path.cwd() / "sample_images", Path(__file__).resolve().parent.parent / "sample_images"):
        if candidate.is_dir():
            return candidate
    raise InputError("no sample_images/ folder found; pass --images and --question (or --samples DIR)")


def read_workload(folder: Path) -> list[Prompt]:
    """`questions.json` in `folder`: a list of {"image", "question", "answer"?} (image names
    relative to the folder), or {"images": [...], "task": "story"} for a multi-image prompt."""
    path = folder / "questions.json"
    if not path.is_file():
        raise InputError(f"no questions.json in {folder}; pass --images and --question")
    try:
        entries = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"cannot read {path}: {error}") from None
    if not isinstance(entries, list):
        raise InputError(f"{path}: expected a list of {{\"image\", \"question\"}} entries")
    prompts = []
    for number, entry in enumerate(entries, start=1):
        images = entry.get("images", [entry.get("image")]) if isinstance(entry, dict) else None
        task = entry.get("task", "ask") if isinstance(entry, dict) else None
        question = entry.get("question") if isinstance(entry, dict) else None
        if not images or not all(isinstance(i, str) for i in images) or task not in ("ask", "story"):
            raise InputError(f"{path}: entry {number} needs an image (or images) and task ask or story")
        if task == "ask" and question is None:
            raise InputError(f"{path}: entry {number} has no question")
        if question is not None:
            checked_text(question, f"{path}: entry {number} question")
        answer = entry.get("answer")
        if answer is not None:
            checked_text(answer, f"{path}: entry {number} answer")
        prompts.append(Prompt(task, tuple(folder / i for i in images), question, answer))
    if not prompts:
        raise InputError(f"{path} holds no entries")
    return prompts


def agreement(baseline_ids: Sequence[int], ids: Sequence[int]) -> tuple[bool, float, int | None]:
    """(same answer token for token, % of the baseline's tokens matched in place, first differing index)."""
    first = next((i for i, (a, b) in enumerate(zip(baseline_ids, ids)) if a != b), None)
    if first is None and len(baseline_ids) != len(ids):
        first = min(len(baseline_ids), len(ids))
    matched = sum(a == b for a, b in zip(baseline_ids, ids))
    percent = 100.0 * matched / max(len(baseline_ids), len(ids)) if (baseline_ids or ids) else 100.0
    return first is None, percent, first


def holds_answer(text: str, expected: str) -> bool:
    """The expected answer appears in the generated text as whole words, ignoring case."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    wanted = re.findall(r"[a-z0-9]+", expected.lower())
    n = len(wanted)
    return n > 0 and any(words[i : i + n] == wanted for i in range(len(words) - n + 1))


def tokens_kept_per_layer(stats: CacheStats | None) -> dict[str, float]:
    if stats is None or not stats.layers:
        return {m: 0.0 for m in MODALITIES}
    n = len(stats.layers)
    return {m: sum(layer.tokens_by_modality.get(m, 0) for layer in stats.layers) / n for m in MODALITIES}


def eviction_overhead_percent(policy: str, eviction_seconds: float | None, run_seconds: float | None) -> float | None:
    """Eviction work as a share of the run; None for the full cache, which evicts nothing (its
    bookkeeping is not eviction)."""
    if policy == FULL_POLICY or eviction_seconds is None or not run_seconds:
        return None
    return 100.0 * eviction_seconds / run_seconds


@dataclass(frozen=True)
class ProfileRow:
    """One policy's numbers over a workload (means over its prompts unless named otherwise)."""

    name: str
    policy: str
    prompts: int
    kv_bytes_final: float
    kv_bytes_peak: float
    full_cache_bytes_final: float
    full_cache_bytes_peak: float
    tokens_kept: dict[str, float]  # per layer, by modality, at the last step
    prefill_ms: float
    decode_tokens_per_second: float  # total decode tokens / total decode time
    eviction_overhead_percent: float | None  # eviction time / (prefill + decode time)
    same_answers: int | None  # prompts whose answer matches the baseline token for token
    token_match_percent: float | None
    first_divergence: int | None  # earliest differing token index over the prompts
    correct: int | None = None  # prompts whose answer holds the expected one (when the workload has answers)
    with_answers: int = 0  # prompts that have an expected answer
    interrupted: bool = False

    def to_json(self) -> dict:
        return asdict(self)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def summarize(name: str, results: Sequence, baseline: Sequence | None = None, expected: Sequence[str | None] | None = None) -> ProfileRow:
    """One policy's `RunResult`s as a row; `baseline` (same prompts, same order) gives agreement,
    `expected` (answers per prompt, None where unknown) gives correctness."""
    decode_seconds = sum(r.decode_seconds for r in results)
    decode_tokens = sum(r.speed_tokens for r in results)  # those decode_seconds covers
    kept = [tokens_kept_per_layer(r.steps[-1] if r.steps else None) for r in results]
    same = match = first = None
    if baseline is not None:
        checks = [agreement(b.token_ids, r.token_ids) for b, r in zip(baseline, results)]
        same = sum(c[0] for c in checks)
        match = _mean([c[1] for c in checks])
        firsts = [c[2] for c in checks if c[2] is not None]
        first = min(firsts) if firsts else None
    graded = [(r, e) for r, e in zip(results, expected or ()) if e]
    return ProfileRow(
        name=name,
        policy=results[0].policy if results else name,
        prompts=len(results),
        kv_bytes_final=_mean([r.kv_bytes_final for r in results]),
        kv_bytes_peak=_mean([r.kv_bytes_peak for r in results]),
        full_cache_bytes_final=_mean([r.full_cache_bytes_final for r in results]),
        full_cache_bytes_peak=_mean([r.full_cache_bytes_peak for r in results]),
        tokens_kept={m: _mean([k[m] for k in kept]) for m in MODALITIES},
        prefill_ms=_mean([r.prefill_seconds * 1000 for r in results]),
        decode_tokens_per_second=decode_tokens / decode_seconds if decode_seconds else 0.0,
        eviction_overhead_percent=eviction_overhead_percent(
            results[0].policy if results else name,
            sum(r.eviction_seconds for r in results), sum(r.prefill_seconds for r in results) + decode_seconds,
        ),
        same_answers=same,
        token_match_percent=match,
        first_divergence=first,
        correct=sum(holds_answer(r.text, e) for r, e in graded) if graded else None,
        with_answers=len(graded),
        interrupted=any(r.interrupted for r in results),
    )


@dataclass
class ProfileReport:
    workload: list[Prompt]
    rows: list[ProfileRow]
    results: dict[str, list] = field(default_factory=dict)  # name -> RunResults, workload order
    interrupted: bool = False  # Ctrl-C: rows cover the prompts that finished under every policy

    def to_json(self, model: str) -> dict:
        done = self.rows[0].prompts if self.rows else 0
        return {
            "model": model,
            "baseline": "full",
            "workload": [p.to_json() for p in self.workload[:done]],
            "summary": [row.to_json() for row in self.rows],
            "runs": {name: [r.to_json() for r in runs] for name, runs in self.results.items()},
            "interrupted": self.interrupted,
        }


def run_profile(
    loaded,
    workload: Sequence[Prompt],
    runs: Sequence,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    on_progress: Callable[[str], None] | None = None,
    show_kept: bool = False,
    kept_step: int | None = None,
    compile: bool = False,
) -> ProfileReport:
    """Every prompt under the full cache (the baseline, run first) and each run: a `(policy name,
    params)` pair or a `Policy`.
    With `show_kept`, each policy's run of the first prompt records what it kept of each image
    (after decode step `kept_step`, None: at the end) in its `kept`. `compile`: every run decodes
    through the compiled step (its warm-up is in each result's `compile_seconds`, not in decode).

    Ctrl-C stops cleanly: what finished is kept and the report says it was interrupted.
    """
    from hae_cli import api

    progress = on_progress or (lambda message: None)
    policies = [api.policy_of(*run) if isinstance(run, tuple) else api.policy_of(run) for run in runs]
    named = [(BASELINE, api.policy_of(FULL_POLICY))] + [(p.name, p) for p in policies if p.name != FULL_POLICY]
    results: dict[str, list] = {name: [] for name, _ in named}
    interrupted = False
    total, done = len(named) * len(workload), 0
    for number, prompt in enumerate(workload):
        kept = dict(show_kept=True, kept_step=kept_step) if show_kept and number == 0 else {}
        for name, policy in named:
            done += 1
            label = f"[{done}/{total}] {name} · {prompt.label()}"
            progress(label)
            try:
                result = api.run(
                    loaded, list(prompt.images), prompt.question, task=prompt.task, policy=policy,
                    max_new_tokens=max_new_tokens, temperature=temperature,
                    top_p=top_p, seed=seed, on_progress=lambda message, label=label: progress(f"{label}: {message}"),
                    compile=compile,
                    on_compile=lambda seconds, label=label: seconds is None and progress(f"{label}: compiling the decode step"),
                    **kept,
                )
            except KeyboardInterrupt:
                interrupted = True
                break
            results[name].append(result)
            if result.interrupted:
                interrupted = True
                break
        if interrupted:
            break
    # Prompts every policy finished; if none did (Ctrl-C in the first), what each has.
    complete = min(len(r) for r in results.values()) or max(len(r) for r in results.values())
    baseline = results[BASELINE][:complete]
    expected = [prompt.answer for prompt in workload[:complete]]
    rows = [
        summarize(name, results[name][:complete], None if name == BASELINE else baseline, expected)
        for name, _ in named
        if results[name]
    ]
    return ProfileReport(list(workload), rows, results, interrupted)
