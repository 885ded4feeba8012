"""`hae eval`'s scene-world additions: the fewer-pixels baseline (the full cache with images read
at fewer crops, at its own KV), the random baseline at HAE's KV, and scores per question type."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hae_cli.cli import app
from hae_cli.evaluation.evaluate import evaluate, plan_of
from hae_cli.evaluation.matching import fewer_crops_settings
from hae_cli.evaluation.records import Columns, RecordProblem, parse_record, read_data
from hae_cli.evaluation.runner import EvalConfig
from hae_cli.scenes import write_jsonl


@pytest.fixture(scope="module")
def four_crop_model(tmp_path_factory):
    """A tiny random Phi-3.5-V checkpoint reading images at 4 crops, and the model loaded."""
    from hae_cli.api import load_model
    from hae_testing.checkpoints.phi3v import write_tiny_checkpoint

    folder = write_tiny_checkpoint(tmp_path_factory.mktemp("four") / "model", num_crops=4)
    return folder, load_model(str(folder))


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("scenes"), seed=11, items=6)


def test_fewer_crops_reads_the_images_at_fewer_crops_and_is_cut_against_the_full_run(tmp_path, four_crop_model, scenes):
    folder, loaded = four_crop_model
    plan = tuple(plan_of("0.3", ["random"]) + fewer_crops_settings([1]))
    config = EvalConfig(model=str(folder), plan=plan, max_new_tokens=2)
    report = evaluate(read_data(scenes), config, tmp_path / "out", loaded=loaded, plot=False)
    rows = {r["setting"]: r for r in report.summary["rows"]}
    line = json.loads((tmp_path / "out" / "results.jsonl").read_text().splitlines()[0])
    full, fewer = line["settings"]["full"], line["settings"]["full @1 crop"]
    # 757 tokens an image at 4 crops, 313 at 1 (+ the same text): the prompt held by each full cache
    assert full["held_after_prefill"] - fewer["held_after_prefill"] == 757 - 313
    assert fewer["image_after_prefill"] == 2 * 144  # one crop and the global view, 12x12 merged patches each
    assert rows["full @1 crop"]["crops"] == 1 and rows["full"].get("crops") is None
    # its cut is against the 4-crop full cache of the same items, not against its own prompt
    assert 50 < rows["full @1 crop"]["cut_pct"] < 60
    # random holds HAE's tokens per layer on every item
    assert rows["random @vk0.3"]["kv_bytes_mean"] == pytest.approx(rows["hae vk0.3"]["kv_bytes_mean"], rel=1e-9)


def test_scores_are_grouped_by_question_type(tmp_path, four_crop_model, scenes):
    folder, loaded = four_crop_model
    config = EvalConfig(model=str(folder), plan=tuple(plan_of("0.3", [])), max_new_tokens=2)
    report = evaluate(read_data(scenes), config, tmp_path / "out", loaded=loaded, plot=False)
    records = [json.loads(line) for line in scenes.read_text().splitlines()]
    results = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["types"] for r in results] == [[record["type"] for record in records][n:n + 1] for n in range(6)]
    for row in report.summary["rows"]:
        expected: dict[str, list[float]] = {}
        for record, result in zip(records, results):
            expected.setdefault(record["type"], []).append(result["settings"][row["setting"]]["scores"][0])
        assert row["by_type"] == {t: {"questions": len(v), "accuracy": sum(v) / len(v)}
                                  for t, v in sorted(expected.items())}


def test_a_chat_turns_types_are_its_own(tmp_path):
    path = write_jsonl(tmp_path, seed=3, items=2, task="chat")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    items = read_data(path, task="chat", strict=True).items
    assert [[q.type for q in item.questions] for item in items] == [[t["type"] for t in r["turns"]] for r in records]


@pytest.mark.parametrize("bad", [3, "", ["label"]])
def test_a_type_that_is_not_text_is_a_bad_record(scenes, bad):
    record = json.loads(scenes.read_text().splitlines()[0])
    with pytest.raises(RecordProblem, match="data.jsonl line 1: type must be text"):
        parse_record({**record, "type": bad}, 0, "data.jsonl line 1", scenes.parent, "ask", Columns())


@pytest.mark.parametrize("value, fragment", [
    ("0", "'0' is not a crop count"),
    ("two", "'two' is not a crop count"),
    ("1,-2", "'-2' is not a crop count"),
])
def test_bad_fewer_crops_are_one_line_before_the_model_loads(scenes, tmp_path, value, fragment):
    result = CliRunner().invoke(app, ["eval", str(scenes), "--fewer-crops", value, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and fragment in result.output, result.output
    assert not (tmp_path / "o").exists()


def test_more_crops_than_the_model_was_trained_for_is_one_line(scenes, tmp_path):
    """The demo model reads 1 crop: a fewer-crops setting of 4 is refused, in one line, before any item."""
    result = CliRunner().invoke(app, ["eval", str(scenes), "--fewer-crops", "4", "--policies", "", "--budgets",
                                      "0.4", "--out", str(tmp_path / "o"), "--quiet"])
    assert result.exit_code == 2 and "--num-crops 4: the demo model was trained with at most 1 crop" in result.output
    assert "Traceback" not in result.output


def test_a_family_without_crops_refuses_a_fewer_crops_setting(tmp_path):
    from hae_cli.api import load_model
    from hae_cli.errors import ConfigError
    from hae_testing.checkpoints.qwen2_vl import write_tiny_checkpoint

    loaded = load_model(str(write_tiny_checkpoint(tmp_path / "qwen", "qwen2_vl", seed=0)))
    with pytest.raises(ConfigError, match="reads images without crops"):
        loaded.at_crops(1)
