"""A whole evaluation: the items not yet in the results run on a backend, each result appended
as it arrives, then the summary of every item, written beside them.

    from pathlib import Path
    from hae_cli.evaluation.evaluate import evaluate, plan_of
    from hae_cli.evaluation.records import read_data
    from hae_cli.evaluation.runner import EvalConfig

    data = read_data(Path("sample_images/eval.jsonl"), task="ask")
    config = EvalConfig(model="demo", plan=tuple(plan_of("thr,0.4", ["snapkv", "h2o"])))
    report = evaluate(data, config, Path("results"))
    print(report.summary["rows"])
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hae_cli.checks import check_outputs, model_files, write_failed
from hae_cli.evaluation import matching
from hae_cli.evaluation.parallel import Backend, run_items
from hae_cli.evaluation.records import Data
from hae_cli.evaluation.runner import EvalConfig
from hae_cli.evaluation.store import CONFIG_FILE, RESULTS_FILE, ResultStore
from hae_cli.evaluation.summary import summarize

SUMMARY_FILE = "summary.json"
PLOT_FILE = "accuracy.png"
FORMAT = 1  # of config.json and results.jsonl


def plan_of(budgets: str, baselines: list[str], settings: list[matching.Setting] = ()) -> list[matching.Setting]:
    """full, the HAE settings of `budgets` (`matching.hae_settings`), each baseline matched to each
    of them, then `settings` (policies at parameters of their own)."""
    return matching.matched_plan(matching.hae_settings(budgets), baselines) + list(settings)


@dataclass
class Report:
    """What a run did: the summary of every item with a result (None when stopped early)."""

    out: Path
    total: int  # items in the data
    resumed: int  # items whose results were there already
    ran: int = 0  # items run now
    errors: list[str] = field(default_factory=list)  # items that could not run (one line each)
    notes: list[str] = field(default_factory=list)  # what the model could not read in the items' text
    warnings: list[str] = field(default_factory=list)  # what the summary leaves out, and why
    interrupted: bool = False
    seconds: float = 0.0
    summary: dict | None = None
    plot: Path | None = None

    @property
    def done(self) -> int:
        return self.resumed + self.ran

    @property
    def items_per_second(self) -> float:
        return self.ran / self.seconds if self.seconds > 0 else 0.0


def evaluate(data: Data, config: EvalConfig, out: Path, *, backend: Backend | None = None, resume: bool = False,
             loaded=None, target_drop: float = 1.0, plot: bool = True,
             on_result: Callable[[int, int], None] | None = None,
             on_backend: Callable[[Backend, str | None], None] | None = None) -> Report:
    """Run the items of `data` that `out` has no result for (all of them unless `resume`),
    appending each result to `out/results.jsonl` as it arrives; then, if every item has one,
    write `summary.json` and the plot. `loaded`: for the in-process backend (one worker, no
    Ray), the model, or a function that loads it (called once `out` is checked, before any
    item runs). `on_result(done, total)` before the first item and after each; `on_backend(backend, note)`
    with the backend as it will run (`Backend.fitted`: workers capped, and the note saying so, or None). Ctrl-C (a `KeyboardInterrupt`) stops
    the run with what finished kept: `report.interrupted`."""
    backend = backend or Backend()
    written = (CONFIG_FILE, RESULTS_FILE, SUMMARY_FILE) + ((PLOT_FILE,) if plot else ())
    check_outputs([("--out", out / name) for name in written],
                  [("the data", data.source)] + [(f"an image of {item.where}", image)
                                                 for item in data.items for image in item.images]
                  + model_files(config.model))
    store = ResultStore(out, run_config(data, config), resume)
    todo = [item for item in data.items if item.id not in store.results]
    report = Report(out, len(data.items), len(data.items) - len(todo))  # the data's items only
    ids = {item.id for item in data.items}
    foreign = [key for key in store.results if key not in ids]
    if foreign:
        report.warnings.append(f"{out / RESULTS_FILE} holds {len(foreign)} result{'s' if len(foreign) > 1 else ''} "
                               f"of no item in the data (id {', '.join(repr(k) for k in foreign[:3])}"
                               f"{', ...' if len(foreign) > 3 else ''}); left out of the counts and the summary")
    backend, capped = backend.fitted(len(todo), config.model)
    if on_backend is not None:
        on_backend(backend, capped)
    if callable(loaded) and todo:
        loaded = loaded()
    if on_result is not None:
        on_result(report.done, report.total)
    started = time.perf_counter()
    with store:
        results = run_items(todo, config, backend, loaded=loaded)
        try:
            for result in results:
                store.append(result)
                report.ran += 1
                if on_result is not None:
                    on_result(report.done, report.total)
        except KeyboardInterrupt:
            report.interrupted = True
        finally:
            results.close()  # the workers stop here, whatever ended the loop
    report.seconds = time.perf_counter() - started
    ordered = [store.results[item.id] for item in data.items if item.id in store.results]
    report.errors = [r["error"] for r in ordered if "error" in r]
    report.notes = [note for r in ordered for note in r.get("notes", ())]
    if report.interrupted:
        return report
    answered = [r for r in ordered if "error" not in r]
    if answered:
        report.summary = {"data": {"source": data.source, "items": len(data.items), "answered": len(answered),
                                   "skipped_records": len(data.skipped), "failed_items": report.errors,
                                   "notes": report.notes},
                          "config": config.to_json(),
                          **summarize(list(config.plan), answered, target_drop, report.warnings),
                          "run": {"backend": backend.describe(), "resumed_items": report.resumed,
                                  "items_run": report.ran, "seconds": round(report.seconds, 2),
                                  "items_per_second": report.items_per_second}}
        write_summary(out / SUMMARY_FILE, report.summary)
        if plot:
            report.plot = out / PLOT_FILE
            from hae_cli.evaluation.plot import plot_accuracy

            plot_accuracy(report.plot, report.summary["rows"], f"{Path(data.source).name}: {len(answered)} items, "
                          f"task {config.task}", f"model {config.model}; {backend.describe()}")
    return report


def run_config(data: Data, config: EvalConfig) -> dict:
    """What the results are of: a resume must match it exactly."""
    return {"hae_eval": FORMAT, **config.to_json(),
            "data": {"items": len(data.items), "fingerprint": data.fingerprint()}}


def write_summary(path: Path, summary: dict) -> None:
    try:
        path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    except OSError as error:
        raise write_failed(error, path) from None
