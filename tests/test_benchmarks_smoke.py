"""Each benchmark runs end to end at tiny sizes and writes the JSON its README promises."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def vqa_checkpoint(tmp_path_factory) -> Path:
    """A tiny official-layout checkpoint that knows easy-VQA's words; 3 layers so FastV's K=2 fits."""
    pytest.importorskip("easy_vqa")
    from hae_testing.data import easyvqa
    from hae_testing.checkpoints.phi3v import write_tiny_checkpoint

    folder = tmp_path_factory.mktemp("bench") / "tiny-vqa"
    return write_tiny_checkpoint(folder, seed=0, num_crops=1, text=dict(num_hidden_layers=3), words=tuple(easyvqa.vocabulary()))


def test_accuracy_runs_and_writes_every_column(vqa_checkpoint, tmp_path):
    accuracy = load("accuracy")
    argv = ["--model", str(vqa_checkpoint), "--limit", "3", "--full-split-limit", "2", "--hae", "thr,0.25"]
    argv += ["--story-sets", "1", "--story-images", "2", "--story-budgets", "0.3", "--workers", "1", "--threads", "1"]
    accuracy.main(argv + ["--out-dir", str(tmp_path), "--quiet"])

    data = json.loads((tmp_path / "accuracy.json").read_text())
    assert (tmp_path / "accuracy.png").stat().st_size > 0
    rows = {r["setting"]: r for r in data["vqa"]["rows"]}
    assert {"full", "hae thr", "hae vk0.25", "snapkv @vk0.25", "h2o @vk0.25", "streaming @vk0.25", "fastv @vk0.25", "mustdrop @vk0.25"} <= set(rows)
    for row in rows.values():
        assert {"accuracy", "drop_points", "kv_bytes_mean", "kv_bytes_peak", "cut_pct", "n", "same_as_full"} <= set(row)
        assert row["n"] == 3 and row["kv_bytes_mean"] > 0
    assert rows["full"]["cut_pct"] == 0 and rows["full"]["drop_points"] == 0
    assert data["vqa_full_split"]["questions"] >= 3
    story = data["stories"]["by_images"]["2"]["rows"]
    assert {r["setting"] for r in story} >= {"full", "hae B=0.3", "h2o B=0.3", "hae vk0.4 (no budget)", "hae vk0.6 (no budget)"}
    assert all({"restored", "binned", "exact_match", "agree_with_full"} <= set(r) for r in story)
    assert len(data["vqa"]["equal_kv"]) == 2


def test_equal_kv_verdict_leaves_out_baselines_that_never_reach_the_cut():
    accuracy = load("accuracy")
    hae = accuracy.hae_settings("0.25")
    rows = [
        {"setting": "hae vk0.25", "policy": "hae", "accuracy": 0.90, "cut_pct": 70.0},
        {"setting": "snapkv @vk0.25", "policy": "snapkv", "accuracy": 0.88, "cut_pct": 70.0},
        {"setting": "fastv @vk0.25", "policy": "fastv", "accuracy": 0.95, "cut_pct": 35.0},  # holds twice the KV
    ]
    (entry,) = accuracy.equal_kv_comparison(rows, hae, ["snapkv", "fastv"])
    assert entry["baselines"]["snapkv"]["hae_at_or_above"]
    assert entry["baselines"]["fastv"]["accuracy_at_equal_kv"] is None
    assert entry["hae_at_or_above_all"] and not entry["hae_at_or_above_all_or_nearest"]
    rows[1]["accuracy"] = 0.91  # a budget-matched baseline that is better does count
    (entry,) = accuracy.equal_kv_comparison(rows, hae, ["snapkv", "fastv"])
    assert not entry["hae_at_or_above_all"]


def test_accuracy_question_after_matches_budgets_on_the_images_alone(vqa_checkpoint, tmp_path):
    accuracy = load("accuracy")
    argv = ["--model", str(vqa_checkpoint), "--limit", "3", "--no-full-split", "--hae", "0.25:r_i=1.0", "--baselines", "snapkv,streaming"]
    accuracy.main(argv + ["--story-sets", "0", "--workers", "1", "--threads", "1", "--question-after", "--out-dir", str(tmp_path), "--quiet"])

    data = json.loads((tmp_path / "accuracy_question_after.json").read_text())
    assert not (tmp_path / "accuracy.json").exists()
    rows = {r["setting"]: r for r in data["vqa"]["rows"]}
    hae, snapkv, streaming = rows["hae vk0.25 r_i=1.0"], rows["snapkv @vk0.25 r_i=1.0"], rows["streaming @vk0.25 r_i=1.0"]
    assert 0 < hae["cut_pct"] < 100
    # snapkv keeps HAE's count; streaming gets the question's rows on top, so it never holds less
    assert snapkv["kv_bytes_mean"] == pytest.approx(hae["kv_bytes_mean"], rel=0.02)
    assert streaming["kv_bytes_mean"] >= hae["kv_bytes_mean"]


def test_speed_runs_and_matches_phi35v_ratio(tmp_path):
    pytest.importorskip("easy_vqa")
    speed = load("speed")
    argv = ["--sizes", "330", "--repeats", "2", "--prefill-repeats", "1", "--decode-tokens", "3", "--hidden", "128", "--layers", "2", "--threads", "1"]
    out = speed.main(argv + ["--out-dir", str(tmp_path), "--quiet"])

    data = json.loads((tmp_path / "speed.json").read_text())
    model = data["model"]
    assert model["kv_per_token_over_weights"] == pytest.approx(model["phi35v_kv_per_token_over_weights"], rel=0.02)
    (row,) = data["rows"]
    for key in ("speedup", "traffic_limit", "speedup_over_limit", "prefill_ratio", "eviction_share_pct", "kv_cut_pct"):
        assert isinstance(row[key], float)
    assert row["hae"]["held_after_prefill"] < row["full"]["held_after_prefill"]  # budget mode pruned
    assert out["rows"][0]["traffic_limit"] > 1.0
    # transformers' own Phi-3 on the same weights decodes the same greedy tokens
    for peer in ("DynamicCache", "StaticCache"):
        assert row[peer]["same_tokens_as_full"] and row[peer]["tokens_per_second"] > 0
        assert isinstance(row["full_over_peer"][peer], float)
    assert row["peers_same_tokens_as_full"]


def test_memory_runs_and_bytes_match_the_formula(vqa_checkpoint, tmp_path):
    memory = load("memory")
    argv = ["--model", str(vqa_checkpoint), "--images", "2", "--decode-tokens", "10", "--threads", "1"]
    memory.main(argv + ["--hae-params", "visual_keep=0.4,r_i=1.0,buffer=4", "--out-dir", str(tmp_path)])

    data = json.loads((tmp_path / "memory.json").read_text())
    assert data["all_held_equal_formula"] and data["all_allocated_within_bound"]
    summary = {s["policy"]: s for s in data["summary"]}
    assert all(summary[p]["allocated_within_bound"] for p in ("hae", "mustdrop", "h2o", "streaming"))
    assert all(summary[p]["allocated_within_bound"] is None for p in ("full", "snapkv", "fastv"))  # no decode budget
    layers = data["policies"]["hae"]["after_decode"]
    assert len(layers) == 3
    assert {"bytes_held", "bytes_formula", "deviation_pct", "bytes_allocated", "bound_bytes", "bytes_by_modality", "bin_bytes_measured"} <= set(layers[0])
    assert all(layer["bytes_allocated"] == layer["bound_bytes"] for layer in layers)  # storage of budget + buffer rows
    peak = data["prefill_peak"]
    assert peak["same_kept_set"]
    assert peak["hae_broadcasting"] < peak["hae_after_prefill"] == peak["full"]


def test_conversation_benchmark_runs_every_policy_turn_by_turn(vqa_checkpoint, tmp_path):
    conversation = load("conversation")
    argv = ["--model", str(vqa_checkpoint), "--conversations", "2", "--images", "2", "--turns", "2,3",
            "--hae", "thr", "--workers", "1", "--threads", "1", "--out-dir", str(tmp_path), "--quiet"]
    conversation.main(argv)

    data = json.loads((tmp_path / "conversation.json").read_text())
    assert (tmp_path / "conversation.png").stat().st_size > 0
    entry = data["by_images"]["2"]
    rows = {r["setting"]: r for r in entry["rows"]}
    assert set(rows) == {"full", "hae thr", "fastv @thr", "snapkv @thr", "h2o @thr", "streaming @thr", "mustdrop @thr", "random @thr"}
    for row in rows.values():
        assert row["conversations"] == 2 and 4 <= row["questions"] <= 6
        assert sum(row["questions_by_turn"].values()) == row["questions"] and row["kv_bytes_mean"] > 0
        assert {"accuracy_by_turn", "all_turns_right", "kv_bytes_peak", "cut_pct", "restored", "binned"} <= set(row)
        assert sum(row["questions_by_kind"].values()) == row["questions"]
    assert rows["full"]["cut_pct"] == 0 and rows["hae thr"]["cut_pct"] > 0
    # budgeted baselines get HAE's tokens per layer after the prefill: the same KV within a few %
    for name in ("snapkv @thr", "h2o @thr", "streaming @thr"):
        assert abs(rows[name]["kv_bytes_mean"] / rows["hae thr"]["kv_bytes_mean"] - 1) < 0.1, name
    assert len(entry["equal_kv"]) == 1 and "baseline_spread" in entry


def test_speed_gpu_runs_at_tiny_size_on_cpu_and_skips_what_its_budget_cannot_fit(tmp_path):
    speed_gpu = load("speed_gpu")
    # 10^8 tokens project far past any budget, however fast this machine decodes 330
    argv = ["--tiny", "--sizes", "330,100000000", "--repeats", "1", "--decode-tokens", "34", "--budget-seconds", "120"]
    speed_gpu.main(argv + ["--out-dir", str(tmp_path), "--quiet"])

    data = json.loads((tmp_path / "speed_gpu.json").read_text())
    (row,) = data["rows"]
    assert [s["size"] for s in data["skipped_sizes"]] == [100000000], "projected past the budget"
    assert row["peers_same_tokens_as_full"] and row["traffic_limit"] > 1.0
    # the compiled rows: our compiled step gives eager's tokens; transformers' compiled forward decodes too
    assert row["compiled_same_tokens"] and row["compiled_speedup"] > 0 and row["compiled_traffic_limit"] > 1.0
    assert row["StaticCache compiled"]["same_tokens_as_full"]
    assert row["hae compiled"]["decode_rounds"] == 1
    assert row["hae"]["decode_rounds"] == 1 and row["hae"]["seconds_per_round"] > 0
    assert data["bin_transfer"]["seconds_per_token_per_layer"] > 0
    per_token = 2 * 2 * 64 * 4  # K and V, 2 KV heads of 64, float32, per layer
    for probe in row["memory"].values():
        assert probe["bytes_held"] % (2 * per_token) == 0 and probe["bytes_held"] <= probe["bytes_allocated"]
        assert probe["nvml_used_delta"] is None  # no CUDA here
    hae = row["memory"]["hae"]
    assert hae["bytes_allocated"] == 2 * (row["hae"]["held_after_prefill"] + 32) * per_token  # budget + buffer
