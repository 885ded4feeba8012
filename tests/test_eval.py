"""`hae eval` (issue 26): a run killed mid-way and resumed equals one that never stopped, item for
item; two local workers and a Ray cluster of 2 CPUs equal one worker; the three data formats
give the same results on the same records; every bad input is one line. The runs use the demo
model on sample_images/ (12 questions) with a small plan, through the real `hae` command."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from cli_runner import hae_in_process
from hae_process import REPO, assert_one_line_error, run_hae, start_hae

SAMPLES = REPO / "sample_images"
PLAN = ["--budgets", "thr,0.4", "--policies", "snapkv,fastv", "-n", "2", "--quiet", "--no-plot"]
ITEMS = 12  # sample_images/questions.json


def results(folder: Path) -> dict[str, dict]:
    """Each item's result without its timings (the one part two runs of an item do not share)."""
    out = {}
    for line in (folder / "results.jsonl").read_text().splitlines():
        record = json.loads(line)
        for setting in record.get("settings", {}).values():
            setting.pop("timings")
        out[record["id"]] = record
    return out


def summary(folder: Path) -> dict:
    """summary.json without the speeds and the run's own timing."""
    data = json.loads((folder / "summary.json").read_text())
    for row in data["rows"]:
        row.pop("speed")
    data.pop("run")
    return data


def evaluate(tmp: Path, name: str, *args: str, data: Path = SAMPLES, timeout: float = 240, **env: str) -> Path:
    out = tmp / name
    run = run_hae if "--ray" in args else hae_in_process  # a Ray cluster must not outlive its run inside pytest
    done = run("eval", str(data), "--out", str(out), *PLAN, *args, timeout=timeout, **env)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The reference: one worker, in the command's own process, never stopped."""
    return evaluate(tmp_path_factory.mktemp("eval"), "whole")


def test_uninterrupted_run_writes_results_summary_and_plot(uninterrupted, tmp_path):
    assert len((uninterrupted / "results.jsonl").read_text().splitlines()) == ITEMS
    data = summary(uninterrupted)
    rows = {row["setting"]: row for row in data["rows"]}
    assert list(rows) == ["full", "hae thr", "hae vk0.4", "snapkv @thr", "fastv @thr", "snapkv @vk0.4", "fastv @vk0.4"]
    assert rows["full"]["accuracy"] == 1.0 and rows["full"]["cut_pct"] == 0
    assert 60 < rows["hae thr"]["cut_pct"] < 80 and rows["hae thr"]["questions"] == ITEMS
    # snapkv holds HAE's tokens per layer on every item: the same KV
    assert abs(rows["snapkv @thr"]["cut_pct"] - rows["hae thr"]["cut_pct"]) < 0.5
    assert [entry["hae"] for entry in data["equal_kv"]] == ["hae thr", "hae vk0.4"]
    plotted = hae_in_process("eval", str(SAMPLES), "--out", str(tmp_path), "--limit", "2", "--budgets", "0.4", "--policies",
                      "snapkv", "-n", "2")
    assert plotted.returncode == 0, plotted.stderr.decode()[-3000:]
    assert (tmp_path / "accuracy.png").stat().st_size > 10_000
    assert "accuracy % at HAE's KV bytes" in plotted.stdout.decode()  # the tables, on stdout


def test_a_killed_run_resumed_equals_the_uninterrupted_one(uninterrupted, tmp_path):
    out = tmp_path / "killed"
    process = start_hae("eval", str(SAMPLES), "--out", str(out), *PLAN)
    lines = out / "results.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        if lines.exists() and len(lines.read_bytes().splitlines()) >= 3:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    kept = len(lines.read_bytes().splitlines())
    assert 3 <= kept < ITEMS, f"the kill came after {kept} of {ITEMS} items"
    with lines.open("ab") as torn:  # as if the kill had landed in the middle of a line
        torn.write(b'{"id":"11","settings":{"full":{"par')

    resumed = hae_in_process("eval", str(SAMPLES), "--out", str(out), *PLAN, "--resume", timeout=240)
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    assert f"{ITEMS} items ({kept} from before, {ITEMS - kept} run now" in resumed.stderr.decode()
    assert len(lines.read_bytes().splitlines()) == ITEMS  # no item twice, no torn line left
    assert results(out) == results(uninterrupted)
    assert summary(out) == summary(uninterrupted)


def test_two_local_workers_equal_one(uninterrupted, tmp_path):
    out = evaluate(tmp_path, "two", "--workers", "2")
    assert results(out) == results(uninterrupted)
    assert summary(out) == summary(uninterrupted)
    assert json.loads((out / "summary.json").read_text())["run"]["backend"] == "2 local workers"


def test_a_ray_cluster_of_two_cpus_equals_the_local_run(uninterrupted, tmp_path):
    pytest.importorskip("ray")
    # a cluster's address left behind (RAY_ADDRESS, or by `ray start`) must not stop --ray local starting its own
    out = evaluate(tmp_path, "ray", "--ray", "local", "--workers", "2", timeout=300, RAY_ADDRESS="127.0.0.1:9")
    assert results(out) == results(uninterrupted)
    assert summary(out) == summary(uninterrupted)
    assert json.loads((out / "summary.json").read_text())["run"]["backend"] == "ray local"


# ----------------------------------------------------------------------------- the three formats


RECORDS = [
    {"id": "q1", "image": "images/easyvqa_test_0698.png", "question": "what color is the shape?", "answer": "yellow"},
    {"id": "q2", "image": "images/easyvqa_test_0416.png", "question": "what shape is in the image?",
     "answer": "circle"},
    {"id": "q3", "image": "images/easyvqa_test_0394.png", "question": "is there a black shape?"},  # no reference
    {"id": "q4", "image": "images/easyvqa_test_0063.png", "question": "what shape is in the image?",
     "choices": ["circle", "triangle", "rectangle"], "answer": "B"},
]


def write_formats(folder: Path) -> dict[str, Path]:
    """The same records as JSONL, as a --samples folder (questions.json) and as a datasets folder
    whose image column holds the pictures."""
    datasets = pytest.importorskip("datasets")
    (folder / "images").mkdir(parents=True)
    for record in RECORDS:
        shutil.copy(SAMPLES / Path(record["image"]).name, folder / record["image"])
    jsonl = folder / "data.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    (folder / "questions.json").write_text(json.dumps(RECORDS))
    rows = [{**{"choices": None, "answer": None}, **r, "image": str(folder / r["image"])} for r in RECORDS]
    dataset = datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())
    dataset.save_to_disk(str(folder / "saved"))  # the pictures' own bytes, in the dataset
    return {"jsonl": jsonl, "samples": folder, "datasets": folder / "saved"}


def test_the_three_formats_give_the_same_results(tmp_path, demo):
    from hae_cli.evaluation.evaluate import evaluate as run, plan_of
    from hae_cli.evaluation.records import read_data
    from hae_cli.evaluation.runner import EvalConfig

    formats = write_formats(tmp_path / "data")
    config = EvalConfig(plan=tuple(plan_of("thr", ["snapkv", "mustdrop"])), max_new_tokens=2)
    outs = {}
    for name, path in formats.items():
        data = read_data(path)
        assert [item.id for item in data.items] == ["q1", "q2", "q3", "q4"] and not data.skipped
        outs[name] = run(data, config, tmp_path / f"out-{name}", loaded=demo, plot=False).out
    first = results(outs["jsonl"])
    assert [s["metrics"] for s in (first[q]["settings"]["full"] for q in ("q1", "q3", "q4"))] == \
        [["exact"], ["agreement"], ["choice"]]
    for name in ("samples", "datasets"):
        assert results(outs[name]) == first, name
        assert summary(outs[name])["rows"] == summary(outs["jsonl"])["rows"], name


def test_chat_and_story_tasks(tmp_path, demo):
    from hae_cli.evaluation.evaluate import evaluate as run, plan_of
    from hae_cli.evaluation.records import read_data
    from hae_cli.evaluation.runner import EvalConfig

    images = [str(SAMPLES / f"easyvqa_test_{n}.png") for n in ("0698", "0416")]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"images": images, "turns": [
        {"question": "what shape is in image 1?", "answer": "triangle"},
        {"question": "what color is the shape in image 2?", "answer": "teal"}]}) + "\n")
    config = EvalConfig(task="chat", plan=tuple(plan_of("thr", ["h2o"])), max_new_tokens=3)
    report = run(read_data(tmp_path / "chat.jsonl", task="chat"), config, tmp_path / "chat", loaded=demo, plot=False)
    full = results(report.out)["0"]["settings"]["full"]
    assert full["answers"] == ["triangle", "teal"] and full["scores"] == [1.0, 1.0]
    assert report.summary["rows"][0]["questions"] == 2

    (tmp_path / "story.jsonl").write_text(json.dumps({"images": images, "answer": "Image 1: a yellow triangle. "
                                                      "Image 2: a teal circle."}) + "\n")
    config = EvalConfig(task="story", plan=tuple(plan_of("0.4", ["snapkv"])), max_new_tokens=16)
    report = run(read_data(tmp_path / "story.jsonl", task="story"), config, tmp_path / "story", loaded=demo,
                 plot=False)
    assert results(report.out)["0"]["settings"]["full"]["scores"] == [1.0]


@pytest.mark.parametrize("model_type", ["qwen2_vl", "gemma3", "qwen3_vl"])
def test_a_native_family_runs_every_task(tmp_path, model_type):
    """Tiny checkpoints of Qwen2-VL (M-RoPE, its own processor), Gemma 3 (sliding windows, image
    blocks) and Qwen3-VL (deepstack): nothing in the evaluation names a family."""
    import importlib

    from hae_cli.api import load_model
    from hae_cli.evaluation.evaluate import evaluate as run, plan_of
    from hae_cli.evaluation.records import read_data
    from hae_cli.evaluation.runner import EvalConfig

    writer = importlib.import_module(f"hae_testing.checkpoints.{model_type}")
    loaded = load_model(str(writer.write_tiny_checkpoint(tmp_path / model_type, model_type, seed=0)))
    images = [str(SAMPLES / "easyvqa_test_0698.png"), str(SAMPLES / "easyvqa_test_0416.png")]
    (tmp_path / "d.jsonl").write_text(json.dumps({"images": images, "turns": [{"question": "what is it?"},
                                                                              {"question": "and now?"}]}) + "\n")
    config = EvalConfig(task="chat", plan=tuple(plan_of("0.4", ["snapkv", "h2o"])), max_new_tokens=3)
    report = run(read_data(tmp_path / "d.jsonl", task="chat"), config, tmp_path / "out", loaded=loaded, plot=False)
    rows = {row["setting"]: row for row in report.summary["rows"]}
    assert not report.errors and rows["full"]["accuracy"] == 1.0  # agreement with itself
    assert rows["hae vk0.4"]["cut_pct"] > 10
    settings = results(report.out)["0"]["settings"]
    assert settings["snapkv @vk0.4"]["params"] == {"budget": settings["hae vk0.4"]["held_after_prefill"]}


def test_an_image_option_reaches_the_workers_model_and_the_stored_configuration(tmp_path):
    """--image-option is part of what a resumed run must share; a run stored without it still resumes."""
    from hae_cli.evaluation.runner import EvalConfig, ItemRunner
    from hae_testing.checkpoints.qwen2_vl import write_tiny_checkpoint

    folder = str(write_tiny_checkpoint(tmp_path / "qwen", "qwen2_vl", seed=0))
    config = EvalConfig(model=folder, image_options=(("max_pixels", 6 * 28 * 28),))
    runner = ItemRunner(config)
    assert runner.loaded.processor_kwargs["size"]["longest_edge"] == 6 * 28 * 28
    assert config.to_json()["image_options"] == {"max_pixels": 6 * 28 * 28}
    assert "image_options" not in EvalConfig(model=folder).to_json()


# ----------------------------------------------------------------------------- bad input, one line each


def jsonl(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = json.dumps({"image": str(SAMPLES / "easyvqa_test_0698.png"), "question": "what color is the shape?",
                   "answer": "yellow"})
FULL_ONLY = ["--budgets", "", "--policies", "", "-n", "1", "--quiet", "--no-plot"]


@pytest.mark.parametrize("bad, fragment", [
    ("{not json", "data.jsonl line 2: not JSON"),
    (json.dumps({"image": "nowhere.png", "question": "q?"}), "data.jsonl line 2: image not found: nowhere.png"),
    (json.dumps({"image": str(SAMPLES / "easyvqa_test_0698.png")}), "data.jsonl line 2: no question"),
    (json.dumps({"image": str(SAMPLES / "easyvqa_test_0698.png"), "question": "q?", "choices": ["a", "b"],
                 "answer": "c"}), "data.jsonl line 2: the answer 'c' is none of the choices"),
], ids=["not-json", "missing-image", "no-question", "answer-not-a-choice"])
def test_a_bad_record_is_skipped_with_its_line_or_refused_with_strict(tmp_path, bad, fragment):
    data = jsonl(tmp_path, GOOD, bad)
    refused = hae_in_process("eval", str(data), "--out", str(tmp_path / "strict"), *FULL_ONLY, "--strict")
    assert_one_line_error(refused, fragment, "--strict")
    assert not (tmp_path / "strict").exists()  # refused before anything was written

    ran = hae_in_process("eval", str(data), "--out", str(tmp_path / "skipping"), *FULL_ONLY, "--json")
    assert ran.returncode == 0, ran.stderr.decode()[-2000:]
    assert f"note: skipped {fragment}" in ran.stderr.decode()
    assert json.loads(ran.stdout)["data"]["skipped_records"] == 1
    assert len((tmp_path / "skipping" / "results.jsonl").read_text().splitlines()) == 1


def test_an_item_the_model_cannot_run_is_said_and_the_run_goes_on(tmp_path, demo):
    from hae_cli.evaluation.evaluate import evaluate as run, plan_of
    from hae_cli.evaluation.records import read_data
    from hae_cli.evaluation.runner import EvalConfig

    (tmp_path / "text.png").write_text("not a picture")
    data = jsonl(tmp_path, GOOD, json.dumps({"id": "bad", "image": "text.png", "question": "q?"}))
    report = run(read_data(data), EvalConfig(plan=tuple(plan_of("", []))), tmp_path / "out", loaded=demo, plot=False)
    assert report.errors == ["data.jsonl line 2: not an image file (or an unsupported format): "
                             f"{tmp_path / 'text.png'}"]
    assert report.summary["data"]["failed_items"] == report.errors and report.summary["rows"][0]["items"] == 1


def test_no_usable_record_is_one_line(tmp_path):
    data = jsonl(tmp_path, json.dumps({"image": "a.png", "question": "q?"}), json.dumps({"question": "q?"}))
    assert_one_line_error(hae_in_process("eval", str(data), *FULL_ONLY), "no usable records in", "image not found: a.png",
                          "(and 1 more)")


def test_a_column_that_does_not_exist_is_one_line(tmp_path):
    formats = write_formats(tmp_path / "data")
    for data in (formats["datasets"], formats["jsonl"]):
        line = assert_one_line_error(hae_in_process("eval", str(data), "--question-column", "query", *FULL_ONLY),
                                     "--question-column 'query' is not a column of")
        assert "question" in line.split("columns:")[1]


def test_resume_against_another_configuration_is_one_line(uninterrupted, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(uninterrupted, out)
    other = ["--budgets", "thr,0.25", "--policies", "snapkv,fastv", "-n", "2", "--quiet", "--no-plot"]
    line = assert_one_line_error(hae_in_process("eval", str(SAMPLES), "--out", str(out), *other, "--resume"),
                                 "--resume:", "another configuration", "plan")
    assert "'hae vk0.25' now, 'hae vk0.4' in the stored run" in line
    fewer = assert_one_line_error(hae_in_process("eval", str(SAMPLES), "--out", str(out), *PLAN, "--limit", "5",
                                          "--resume"), "another configuration")
    assert "data" in fewer
    again = assert_one_line_error(hae_in_process("eval", str(SAMPLES), "--out", str(out), *PLAN),
                                  "holds the results of an earlier run", "--resume")
    assert "results.jsonl" in again


@pytest.mark.parametrize("module, args, fragment", [
    ("ray", ["--ray", "local"], "--ray needs Ray, an optional extra: pip install 'hae-cli[ray]'"),
    ("datasets", [], "reading a saved dataset needs the datasets package: pip install 'hae-cli[datasets]'"),
])
def test_a_missing_optional_extra_is_one_line(tmp_path, module, args, fragment):
    hidden = tmp_path / "hidden"
    (hidden / module).mkdir(parents=True)
    (hidden / module / "__init__.py").write_text(f"raise ImportError(\"No module named {module!r}\")\n")
    data = write_formats(tmp_path / "data")["datasets" if module == "datasets" else "jsonl"]
    path = os.pathsep.join([str(hidden), os.environ.get("PYTHONPATH", "")])
    assert_one_line_error(run_hae("eval", str(data), *FULL_ONLY, *args, "--out", str(tmp_path / "o"),  # its own PYTHONPATH
                                  PYTHONPATH=path), fragment)
    assert not (tmp_path / "o").exists()


def test_a_ray_address_where_no_cluster_answers_is_one_line(tmp_path):
    """Ray itself would retry for minutes, printing; hae looks first."""
    pytest.importorskip("ray")
    import socket

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    started = time.monotonic()
    out = tmp_path / "o"
    assert_one_line_error(run_hae("eval", str(jsonl(tmp_path, GOOD)), *FULL_ONLY, "--ray", f"127.0.0.1:{port}",
                                  "--out", str(out)),
                          f"--ray 127.0.0.1:{port}: no Ray cluster answers at", "ray start --head")
    assert time.monotonic() - started < 60
    assert not out.exists()  # told before anything is written


@pytest.mark.parametrize("args, fragment", [
    (["--policies", "nosuch"], "unknown policy 'nosuch'"),
    (["--budgets", "big"], "--budgets: 'big' is neither thr nor a fraction"),
    (["--budgets", "0.4:r_g=x"], "hae parameter r_g expects"),
    (["--budgets", "", "--policies", "snapkv"], "--policies run at HAE's KV on each item: give HAE's settings"),
    (["--setting", "h2o:budget=0.3", "--setting", "h2o:budget=0.3"], "the setting 'h2o budget=0.3' is given twice"),
    (["--split", "test"], "--split chooses a split of a saved dataset"),
], ids=["policy", "budget", "hae-param", "unmatched", "twice", "split"])
def test_bad_options_are_one_line_before_the_model_loads(tmp_path, args, fragment):
    assert_one_line_error(hae_in_process("eval", str(jsonl(tmp_path, GOOD)), "--out", str(tmp_path / "o"), *args),
                          fragment)
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("answer, normalised", [
    ("The Two dogs.", "2 dogs"), ("1,000", "1000"), ("3.5", "3.5"), ("yes!", "yes"), ("  RED ", "red"),
    ("an apple", "apple"), ("ten", "10"), ("t-shirt", "t shirt"), ("It's", "its"), ("none", "0"), ("A", "a"),
])
def test_vqa_normalisation(answer, normalised):
    from hae_cli.evaluation.metrics import normalize_answer

    assert normalize_answer(answer) == normalised


def test_exact_match_takes_any_reference():
    from hae_cli.evaluation.metrics import exact_match

    assert exact_match("Two.", ["3", "2"]) and exact_match("the red one", ["red one"])
    assert not exact_match("red", ["dark red"]) and not exact_match("", ["a"]) and not exact_match("the", ["a"])


@pytest.mark.parametrize("answer, letter", [
    ("B", "B"), ("B.", "B"), ("(B) dog", "B"), ("B) dog", "B"), ("The answer is C", "C"), ("answer: (A)", "A"),
    ("dog", "B"), ("A dog", "B"), ("Bird.", "C"), ("D", None), ("I think so", None), ("the answer is a cat", None),
])
def test_the_chosen_letter(answer, letter):
    from hae_cli.evaluation.metrics import chosen_letter

    assert chosen_letter(answer, ["cat", "dog", "bird"]) == letter


def test_a_reference_as_letter_text_or_index():
    from hae_cli.evaluation.metrics import reference_letter

    choices = ["cat", "dog", "bird"]
    assert [reference_letter(a, choices) for a in ("b", "dog", 2, "fish", 3, True)] == ["B", "B", "C", None, None, None]


def test_agreement_and_the_score_without_reference():
    from hae_cli.evaluation.metrics import agreement, score_answer

    assert agreement([1, 2, 3], [1, 2, 4]) == 2 / 3 and agreement([], []) == 1.0 and agreement([1], []) == 0.0
    assert score_answer("x", [1], [1], (), ()) == ("agreement", 1.0)
    assert score_answer("x", [1], [2], (), ()) == ("agreement", 0.0)
    assert score_answer("(B)", [1], [2], ("B",), ("a", "b")) == ("choice", 1.0)
    assert score_answer("the Red.", [1], [2], ("red",), ()) == ("exact", 1.0)
