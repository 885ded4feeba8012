"""`hae` end to end on a tiny checkpoint in the official Phi-3.5-V layout: the real loader,
model, cache and policies behind the CLI (Typer's runner), a few decode steps each."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cli_runner import invoke
from conftest import TINY_LAYERS

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
REPO = Path(__file__).resolve().parent.parent


def ok(result):
    assert result.exit_code == 0, result.output
    return result


def test_ask_json_reports_the_cache(checkpoint, images):
    result = ok(invoke("ask", images[0], "what color is the shape?", "--model", checkpoint, "-n", "6", "--json"))
    payload = json.loads(result.stdout)
    assert payload["policy"] == "hae" and isinstance(payload["text"], str)
    assert 1 <= payload["timings"]["decode_tokens"] <= 6
    assert payload["prompt_tokens"]["image"] > 0
    assert len(payload["final_cache"]["layers"]) == TINY_LAYERS
    assert 0 < payload["kv_bytes"]["final"] <= payload["kv_bytes"]["full_cache_final"]


def test_ask_plain_and_the_panel_of_a_known_run(checkpoint, images):
    """The live panel's final rows carry the same per-layer counts as the JSON of the same
    (greedy, so identical) run."""
    common = ("ask", images[0], "what color is the shape?", "--model", checkpoint, "-n", "5", "--budget", "0.5")
    expected = json.loads(ok(invoke(*common, "--json")).stdout)["final_cache"]["layers"]
    plain = ok(invoke(*common)).stdout
    assert "policy hae  done" in plain and "KV cache" in plain and "prefill" in plain
    live = ANSI.sub("", ok(invoke(*common, env={"TTY_COMPATIBLE": "1", "COLUMNS": "120"})).stdout)
    rows = [line for line in live.splitlines() if re.match(r"\s*L\d+\s", line)][-TINY_LAYERS:]
    for layer, row in zip(expected, rows):
        by = layer["tokens_by_modality"]
        budget = "-" if layer["budget"] is None else str(layer["budget"])
        numbers = [layer["tokens_held"], budget, by.get("text", 0), by.get("image", 0),
                   by.get("separator", 0), by.get("generated", 0), layer["bin_tokens"]]
        assert row.split()[0] == f"L{layer['layer']}"
        assert row.split()[-7:] == [str(n) for n in numbers], row


def test_story_over_two_images(checkpoint, images):
    result = ok(invoke("story", *images, "--model", checkpoint, "-n", "12", "--budget", "0.3", "--json"))
    payload = json.loads(result.stdout)
    assert payload["prompt_tokens"]["image"] > 0 and payload["timings"]["decode_tokens"] <= 12
    assert any(event["stage"] == "prefill" for event in payload["events"]) or payload["events"] == []


def test_profile_table_json_and_plot(checkpoint, images, tmp_path):
    out, png = tmp_path / "profile.json", tmp_path / "occupancy.png"
    result = ok(invoke("profile", "--model", checkpoint, "--images", images[0], "--question", "what color?",
                       "--compare", "baseline,snapkv,h2o", "--budget", "0.5", "-n", "4",
                       "--json", out, "--plot", png))
    assert re.search(r"baseline \(full\)\s+┃\s+hae\s+┃\s+snapkv\s+┃\s+h2o", result.stdout)
    for label in ("KV bytes final", "KV bytes peak", "kept image", "prefill ms", "decode tok/s",
                  "eviction overhead", "same answer", "token match", "first divergence"):
        assert label in result.stdout
    payload = json.loads(out.read_text())
    assert [row["name"] for row in payload["summary"]] == ["baseline", "hae", "snapkv", "h2o"]
    baseline = payload["summary"][0]
    assert baseline["same_answers"] is None and baseline["kv_bytes_final"] == baseline["full_cache_bytes_final"]
    assert all(row["kv_bytes_final"] <= baseline["kv_bytes_final"] for row in payload["summary"])
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


@pytest.mark.skipif(not (REPO / "sample_images" / "questions.json").is_file(),
                    reason="sample_images/questions.json not written yet")
def test_profile_default_workload(checkpoint, monkeypatch):
    monkeypatch.chdir(REPO)
    result = ok(invoke("profile", "--model", checkpoint, "--limit", "1", "-n", "2", "--json", "-"))
    assert len(json.loads(result.stdout)["workload"]) == 1


@pytest.mark.parametrize("args, fragment", [
    (["--policy", "lru"], "unknown policy 'lru'"),
    (["--budget", "1.5"], "above 1 as a fraction"),
    (["--policy", "full", "--budget", "0.5"], "policy full has no parameter 'budget'"),
    (["--score-layer", "99"], "score_layer"),
])
def test_bad_policy_input_on_the_real_registry(checkpoint, images, args, fragment):
    result = invoke("ask", images[0], "what?", "--model", checkpoint, *args)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.strip().startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert fragment in result.stderr and "Traceback" not in result.output


def test_model_not_found_offline(images, tmp_path):
    for model in (tmp_path / "no_such_model", "nobody/no-such-model-hae-test"):
        result = invoke("ask", images[0], "what?", "--model", model, env={"HF_HUB_OFFLINE": "1"})
        assert result.exit_code == 2 and result.stdout == "", result.output
        assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
        assert "no_such_model" in result.stderr or "not in the local Hugging Face cache" in result.stderr
