"""`hae profile`'s view of a comparison: one workload run by `hae_cli.evaluation` under the full
cache and other policies, summed per policy into the rows of its table and its JSON.

The workload is `evaluation.records`' (`read_workload`), the runs `evaluation.runner.run_workload`'s,
agreement and correctness `evaluation.metrics`'. Usable from Python:

    from hae_cli.api import load_model
    from hae_cli.compare import run_profile
    from hae_cli.evaluation.records import read_workload, sample_folder

    loaded = load_model("demo")
    report = run_profile(loaded, read_workload(sample_folder()), [("hae", {}), ("snapkv", {"budget": 0.5})])
    for row in report.rows:
        print(row.name, row.kv_bytes_final, row.token_match_percent)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from hae_cli.cache.modality import MODALITY_NAMES
from hae_cli.cache.stats import CacheStats
from hae_cli.evaluation.metrics import holds_answer, token_match
from hae_cli.evaluation.records import Prompt

BASELINE = "baseline"  # the name a profile gives the full cache
FULL_POLICY = "full"
MODALITIES = tuple(MODALITY_NAMES.values())


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
        checks = [token_match(b.token_ids, r.token_ids) for b, r in zip(baseline, results)]
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
    from hae_cli.evaluation.runner import run_workload

    policies = [api.policy_of(*run) if isinstance(run, tuple) else api.policy_of(run) for run in runs]
    named = [(BASELINE, api.policy_of(FULL_POLICY))] + [(p.name, p) for p in policies if p.name != FULL_POLICY]
    results, interrupted = run_workload(
        loaded, workload, named, on_progress=on_progress or (lambda message: None),
        kept_first=dict(show_kept=True, kept_step=kept_step) if show_kept else {},
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, compile=compile,
    )
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
