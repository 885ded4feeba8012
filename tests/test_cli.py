"""The CLI's own work, without a model: option parsing and validation, one-line errors, output
modes (plain, --json, live), Ctrl-C and out-of-memory, and the profile table.

`hae_cli.api.load_model`/`run` are replaced by a fake that replays hand-made cache snapshots,
and the policy registry by a small one declared here, so these tests take a second. The same
commands run for real on a tiny checkpoint in `test_cli_e2e.py`.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest

from cli_runner import invoke, one_error
from hae_cli import api
from hae_cli.cache.stats import CacheStats, EvictionEvent, LayerStats
from hae_cli.errors import ConfigError, ModelNotFoundError

N_LAYERS = 4
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


# ----------------------------------------------------------------------------- fakes


@dataclass
class FullPolicy:
    """No eviction."""

    name: ClassVar[str] = "full"


@dataclass
class HaePolicy:
    """Fake HAE: the parameters the CLI names."""

    name: ClassVar[str] = "hae"
    budget: int | float | None = None
    visual_keep: float | None = None
    score_layer: int = 1
    gamma: float = 0.95
    broadcast: bool = False

    def __post_init__(self):
        if self.visual_keep is not None and not 0 < self.visual_keep <= 1:
            raise ConfigError(f"visual_keep must be in (0, 1], got {self.visual_keep}")


@dataclass
class BudgetPolicy:
    """A decode-time policy with a budget."""

    name: ClassVar[str] = "snapkv"
    budget: int | float | None = None
    window: int = 32


@dataclass
class OtherBudgetPolicy(BudgetPolicy):
    name: ClassVar[str] = "h2o"


@dataclass
class StreamingPolicy:
    """Sinks and a recent window."""

    name: ClassVar[str] = "streaming"
    sink: int = 4
    recent: int = 256


FAKE_POLICIES = {"full": FullPolicy, "hae": HaePolicy, "snapkv": BudgetPolicy, "h2o": OtherBudgetPolicy,
                 "streaming": StreamingPolicy}


def parameters_given(policy) -> dict:
    """The parameters a policy object was given (those off their defaults), as the CLI passed them."""
    return {f.name: getattr(policy, f.name) for f in dataclasses.fields(policy) if getattr(policy, f.name) != f.default}


def stats_at(step: int, policy: str) -> CacheStats:
    image = 600 if policy == "full" else 240
    layers = []
    for i in range(N_LAYERS):
        by = {"text": 30, "image": image - 10 * i, "separator": 12, "generated": step}
        held = sum(by.values())
        layers.append(LayerStats(i, by, held, None if policy == "full" else 300, 2 * i if step else 0,
                                 held * 512, 2 * i * 512 if step else 0))
    events = []
    if step == 0 and policy != "full":
        events = [EvictionEvent(0, i, "prefill", "evicted", {"image": 360 + 10 * i}) for i in range(N_LAYERS)]
    elif step == 2 and policy != "full":
        events = [EvictionEvent(2, i, "decode", "binned", {"image": 2 * i}) for i in range(1, N_LAYERS)]
    return CacheStats(step, layers, full_cache_bytes=(642 + step) * N_LAYERS * 512, events=events)


class FakeApi:
    """Stands in for `load_model` and `run`: streams 'A red circle .' one word a step."""

    def __init__(self, interrupt_at: int | None = None, raise_in_run: BaseException | None = None,
                 raise_in_load: BaseException | None = None):
        self.interrupt_at = interrupt_at
        self.raise_in_run = raise_in_run
        self.raise_in_load = raise_in_load
        self.loads: list[dict] = []
        self.runs: list[dict] = []

    def load_model(self, model="demo", device=None, dtype=None, num_crops=None, on_progress=None, image_options=None):
        self.loads.append(dict(model=model, device=device, dtype=dtype, num_crops=num_crops,
                               image_options=image_options))
        if on_progress:
            on_progress("loading weights")
        if self.raise_in_load is not None:
            raise self.raise_in_load
        return SimpleNamespace(name=model, num_layers=N_LAYERS, folder=Path("."), load_seconds=0.0)

    def run(self, loaded, images, question, settings=None, *, task="ask", on_token=None, on_step=None,
            on_progress=None, on_prefill=None, on_compile=None, **fields):
        chosen = api.RunSettings.of(settings, fields)  # what the real run would be given
        policy_params, policy = parameters_given(chosen.policy), chosen.policy.name
        max_new_tokens = chosen.max_new_tokens
        self.runs.append(dict(images=[str(i) for i in images], question=question, task=task, policy=policy,
                              policy_params=policy_params, max_new_tokens=max_new_tokens,
                              temperature=chosen.temperature, top_p=chosen.top_p, seed=chosen.seed,
                              compile=chosen.compile))
        if on_progress:
            on_progress("reading images")
        if on_prefill:
            on_prefill()
        if self.raise_in_run is not None:
            raise self.raise_in_run
        words = ["A", " red", " circle", "."] if policy in ("full", "hae") else ["A", " blue", " square", "."]
        words = words[:max_new_tokens]
        steps = [stats_at(0, policy)]
        if on_step:
            on_step(steps[-1])
        interrupted = False
        for i, word in enumerate(words, start=1):
            if self.interrupt_at is not None and i > self.interrupt_at:
                interrupted = True
                break
            if on_token:
                on_token(word)
            steps.append(stats_at(i, policy))
            if on_step:
                on_step(steps[-1])
        produced = words[: len(steps) - 1]
        return api.RunResult(
            policy=policy, text="".join(produced), token_ids=[hash(w) % 1000 for w in produced],
            prompt_tokens={"text": 30, "image": 600, "separator": 12}, prefill_seconds=0.25,
            decode_seconds=0.1 * len(produced), eviction_seconds=0.01, decode_tokens=len(produced),
            steps=steps, events=[e for s in steps for e in s.events], interrupted=interrupted,
        )


@pytest.fixture
def fake_policies(monkeypatch):
    import hae_cli.cache.policies as registry

    monkeypatch.setattr(registry, "known_policies", lambda: FAKE_POLICIES)


@pytest.fixture
def fake_api(monkeypatch, fake_policies):
    fake = FakeApi()
    monkeypatch.setattr(api, "load_model", fake.load_model)
    monkeypatch.setattr(api, "run", fake.run)
    return fake


def png_bytes(width: int = 8, height: int = 8, rgb=(200, 30, 30)) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "red.png"
    path.write_bytes(png_bytes())
    return path


# ----------------------------------------------------------------------------- bad input: one line, exit 2


def test_missing_image(fake_api, tmp_path):
    one_error(invoke("ask", tmp_path / "nope.png", "what?"), "image not found", "nope.png")
    assert fake_api.loads == []  # failed before loading the model


def test_image_is_a_directory(fake_api, tmp_path):
    one_error(invoke("ask", tmp_path, "what?"), "directory")


def test_text_file_named_png(fake_api, tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("this is not an image\n")
    one_error(invoke("ask", fake, "what?"), "not an image", "notes.png")


def test_truncated_png(fake_api, tmp_path):
    path = tmp_path / "cut.png"
    path.write_bytes(png_bytes(64, 64)[:70])
    one_error(invoke("ask", path, "what?"), "cut.png")


def test_truncated_jpeg(fake_api, tmp_path):
    from PIL import Image

    full = tmp_path / "full.jpg"
    Image.new("RGB", (64, 64), (10, 200, 10)).save(full, quality=90)
    path = tmp_path / "cut.jpg"
    path.write_bytes(full.read_bytes()[: len(full.read_bytes()) // 2])
    one_error(invoke("ask", path, "what?"), "truncated", "cut.jpg")


def test_zero_size_image(fake_api, tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    one_error(invoke("ask", path, "what?"), "empty", "empty.png")


def test_unknown_policy(fake_api, image):
    one_error(invoke("ask", image, "what?", "--policy", "lru"), "unknown policy 'lru'", "hae")


@pytest.mark.parametrize("budget, fragment", [
    ("0", "must be > 0"), ("-5", "must be > 0"), ("0.0", "must be > 0"), ("-0.5", "must be > 0"),
    ("1.5", "above 1 as a fraction"), ("abc", "token count"), ("nan", "must be a finite number"), ("", "token count"),
])
def test_bad_budget(fake_api, image, budget, fragment):
    one_error(invoke("ask", image, "what?", "--budget", budget), "--budget", fragment)


def test_unknown_compare_name(fake_api):
    one_error(invoke("profile", "--compare", "baseline,lru"), "unknown --compare name 'lru'")


def test_model_not_found(fake_api, image):
    fake_api.raise_in_load = ModelNotFoundError("model folder not found: /no/such/model")
    one_error(invoke("ask", image, "what?", "--model", "/no/such/model"), "model folder not found")


def test_story_without_images(fake_api):
    one_error(invoke("story"), "Missing argument 'IMAGE'")


def test_max_new_tokens_zero(fake_api, image):
    one_error(invoke("ask", image, "what?", "--max-new-tokens", "0"), "--max-new-tokens")


@pytest.mark.parametrize("args, fragment", [
    (["--policy", "streaming", "--budget", "0.5"], "policy streaming has no parameter 'budget'"),
    (["-p", "gamma"], "NAME=VALUE"),
    (["-p", "gamma=fast"], "hae parameter gamma expects float"),
    (["-p", "score_layer=1.5"], "expects a whole number"),
    (["--visual-keep", "1.5"], "--visual-keep must be a fraction in (0, 1]"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--temperature", "-1"], "--temperature"),
    (["--num-crops", "0"], "--num-crops"),
    (["--max-new-tokens", "many"], "--max-new-tokens"),
])
def test_bad_options(fake_api, image, args, fragment):
    one_error(invoke("ask", image, "what?", *args), fragment)


def test_empty_question_and_missing_argument(fake_api, image):
    one_error(invoke("ask", image, "  "), "question is empty")
    one_error(invoke("ask", image), "Missing argument", "hae ask --help")


def test_out_of_memory_is_one_line(monkeypatch, fake_api, image):
    import torch

    fake_api.raise_in_run = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    one_error(invoke("ask", image, "what?"), "out of memory", "--budget", code=1)
    fake_api.raise_in_run = MemoryError()
    one_error(invoke("ask", image, "what?"), "out of memory", code=1)


# ----------------------------------------------------------------------------- ask / story output


def test_ask_plain_streams_the_answer_then_a_summary(fake_api, image):
    result = invoke("ask", image, "What color?", "--budget", "0.5", "--visual-keep", "0.4", "-p", "gamma=0.9",
                    "--max-new-tokens", "8", "--seed", "3", "--num-crops", "4", "--dtype", "float32",
                    "--image-option", "max-tiles=2")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("A red circle.\n\n")
    assert "ask: red.png  policy hae  done" in result.stdout
    assert "prefill 250 ms" in result.stdout and "prefill evicted image" in result.stdout
    assert result.stderr == ""
    run = fake_api.runs[0]
    assert run["policy_params"] == {"budget": 0.5, "visual_keep": 0.4, "gamma": 0.9}
    assert (run["task"], run["question"], run["max_new_tokens"], run["seed"]) == ("ask", "What color?", 8, 3)
    assert run["compile"] is False
    assert fake_api.loads[0] == dict(model="demo", device=None, dtype="float32", num_crops=None,
                                     image_options={"max_tiles": 2, "num_crops": 4})  # the family checks them


def test_compile_flag_reaches_the_run_on_every_command(fake_api, image, tmp_path):
    assert invoke("ask", image, "q", "--compile").exit_code == 0
    assert invoke("story", image, "--compile").exit_code == 0
    assert [r["compile"] for r in fake_api.runs] == [True, True]


def test_budget_token_count_is_an_int(fake_api, image):
    assert invoke("ask", image, "q", "--budget", "512").exit_code == 0
    assert invoke("ask", image, "q", "--budget", "1").exit_code == 0
    assert [r["policy_params"]["budget"] for r in fake_api.runs] == [512, 1]
    assert isinstance(fake_api.runs[0]["policy_params"]["budget"], int)


def test_ask_json_is_the_only_thing_on_stdout(fake_api, image):
    result = invoke("ask", image, "What color?", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["text"] == "A red circle." and payload["policy"] == "hae"
    assert payload["kv_bytes"]["final"] < payload["kv_bytes"]["full_cache_final"]
    assert payload["events"][0]["action"] == "evicted" and payload["memory"]["host_rss_bytes"] > 0
    assert payload["model"] == "demo"


def test_story_passes_images_in_order_and_the_prompt(fake_api, image, tmp_path):
    second = tmp_path / "b.png"
    second.write_bytes(png_bytes(rgb=(0, 0, 200)))
    result = invoke("story", image, second, "--prompt", "Tell a tale.", "--no-live")
    assert result.exit_code == 0, result.output
    assert fake_api.runs[0]["images"] == [str(image), str(second)]
    assert fake_api.runs[0]["task"] == "story" and fake_api.runs[0]["question"] == "Tell a tale."
    invoke("story", image)
    assert fake_api.runs[1]["question"] is None  # the API's default story prompt


def test_live_panel_on_a_terminal(fake_api, image):
    result = invoke("ask", image, "What color?", env={"TTY_COMPATIBLE": "1", "COLUMNS": "110"})
    assert result.exit_code == 0, result.output
    text = ANSI.sub("", result.stdout)
    rows = [line for line in text.splitlines() if re.match(r"\s*L\d+\s", line)][-N_LAYERS:]
    assert [int(re.match(r"\s*L(\d+)", row).group(1)) for row in rows] == list(range(N_LAYERS))
    assert re.search(r"L3\s.*\s(\d+)\s+300\s+30\s+210\s+12\s+4\s+6\s*$", rows[3])
    assert "A red circle." in text and "tokens held" in text


def test_ctrl_c_during_decode_prints_the_partial_answer_and_exits_130(fake_api, image):
    fake_api.interrupt_at = 2
    result = invoke("ask", image, "What color?")
    assert result.exit_code == 130
    assert result.stdout.startswith("A red\n") and "interrupted" in result.stdout
    assert "interrupted" in result.stderr and "Traceback" not in result.output
    json_result = invoke("ask", image, "What color?", "--json")
    assert json_result.exit_code == 130 and json.loads(json_result.stdout)["interrupted"] is True


def test_ctrl_c_before_decoding_exits_130(fake_api, image):
    fake_api.raise_in_load = KeyboardInterrupt()
    result = invoke("ask", image, "What color?")
    assert result.exit_code == 130 and "interrupted" in result.stderr and "Traceback" not in result.output
    assert result.stdout == ""


@pytest.mark.parametrize("where", ["raise_in_load", "raise_in_run"])
def test_interrupted_before_any_token_under_json_is_still_one_json_document(fake_api, image, tmp_path, where):
    setattr(fake_api, where, KeyboardInterrupt())
    result = invoke("ask", image, "What color?", "--json")
    assert result.exit_code == 130 and "before any token" in result.stderr
    assert json.loads(result.stdout) == {"interrupted": True, "text": "", "token_ids": [], "model": "demo"}
    out = tmp_path / "profile.json"
    result = invoke("profile", "--images", image, "-q", "What color?", "--json", out)
    assert result.exit_code == 130
    payload = json.loads(out.read_text())
    assert payload["interrupted"] is True and payload["summary"] == []
    assert all(runs == [] for runs in payload["runs"].values())


def test_help_teaches_by_example():
    for args, example in ([[], "hae ask sample_images/easyvqa_test_0698.png"], [["ask"], "--budget 256 --visual-keep 0.3"],
                          [["story"], "hae story sample_images/easyvqa_test_0063.png"],
                          [["profile"], "--compare baseline,snapkv,h2o"]):
        result = invoke(*args, "--help")
        assert result.exit_code == 0 and example in result.stdout
    assert "easy-VQA" in invoke("ask", "--help").stdout and "Phi-3.5-vision-instruct" in invoke("--help").stdout


def test_policies_lists_parameters(fake_policies):
    result = invoke("policies", env={"COLUMNS": "140"})
    assert result.exit_code == 0, result.output
    assert "visual_keep = None" in result.stdout and "recent = 256" in result.stdout


# ----------------------------------------------------------------------------- profile


@pytest.fixture
def samples(tmp_path) -> Path:
    folder = tmp_path / "samples"
    folder.mkdir()
    (folder / "a.png").write_bytes(png_bytes())
    (folder / "b.png").write_bytes(png_bytes(rgb=(0, 0, 200)))
    (folder / "questions.json").write_text(json.dumps([
        {"image": "a.png", "question": "What color?", "answer": "red"},
        {"image": "b.png", "question": "What shape?"},
        {"image": "b.png", "question": "What color?"},
    ]))
    return folder


def test_profile_table_json_and_plot(fake_api, samples, tmp_path):
    out, png = tmp_path / "profile.json", tmp_path / "occ.png"
    result = invoke("profile", "--samples", samples, "--compare", "baseline,snapkv", "--budget", "0.5",
                    "--json", out, "--plot", png, env={"COLUMNS": "140"})
    assert result.exit_code == 0, result.output
    assert [(r["policy"], Path(r["images"][0]).name) for r in fake_api.runs] == [
        ("full", "a.png"), ("hae", "a.png"), ("snapkv", "a.png"),
        ("full", "b.png"), ("hae", "b.png"), ("snapkv", "b.png"),
        ("full", "b.png"), ("hae", "b.png"), ("snapkv", "b.png"),
    ]
    assert [r["policy_params"] for r in fake_api.runs[:3]] == [{}, {"budget": 0.5}, {"budget": 0.5}]
    assert len(fake_api.loads) == 1
    table = result.stdout
    assert re.search(r"baseline \(full\)\s+┃\s+hae\s+┃\s+snapkv", table)
    assert re.search(r"same answer\s+│\s+-\s+│\s+3/3\s+│\s+0/3", table)
    assert re.search(r"first divergence\s+│\s+-\s+│\s+none\s+│\s+token 1", table)
    assert re.search(r"expected answer\s+│\s+1/1\s+│\s+1/1\s+│\s+0/1", table)  # only a.png has one
    payload = json.loads(out.read_text())
    assert [row["name"] for row in payload["summary"]] == ["baseline", "hae", "snapkv"]
    assert payload["summary"][1]["kv_bytes_final"] < payload["summary"][0]["kv_bytes_final"]
    assert len(payload["workload"]) == 3 and len(payload["runs"]["hae"]) == 3
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot written to {png} (prompt 1 of 3: ask a.png)" in result.stderr  # says which prompt it draws
    assert re.search(r"eviction overhead\s+│\s+-\s+│\s+\d", table)  # the full cache evicts nothing


def test_profile_json_to_stdout_is_only_json(fake_api, image):
    result = invoke("profile", "--images", image, "--question", "What color?", "--json", "-")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["summary"][1]["same_answers"] == 1


def test_profile_story_over_given_images(fake_api, image, tmp_path):
    second = tmp_path / "b.png"
    second.write_bytes(png_bytes())
    result = invoke("profile", "--images", image, "--images", second, "--task", "story", "-n", "3")
    assert result.exit_code == 0, result.output
    assert [(r["task"], len(r["images"]), r["max_new_tokens"]) for r in fake_api.runs] == [("story", 2, 3)] * 2


@pytest.mark.parametrize("args, fragment", [
    (["--images", "{image}"], "needs --question"),
    (["--question", "What?"], "--question needs --images"),
    (["--samples", "{empty}"], "no questions.json"),
    (["--images", "{image}", "-q", "x", "--plot", "out.jpg"], "ending in .png"),
    (["--images", "{image}", "-q", "x", "--policy", "streaming", "--budget", "9"], "no policy in this profile"),
    (["--images", "{image}", "-q", "x", "--plot", "/no/such/dir/x.png"], "does not exist"),
])
def test_profile_bad_input(fake_api, image, tmp_path, args, fragment):
    args = [a.format(image=image, empty=tmp_path) for a in args]
    one_error(invoke("profile", *args), fragment)


def test_profile_interrupted_shows_what_finished(fake_api, image):
    fake_api.interrupt_at = 1
    result = invoke("profile", "--images", image, "--question", "What?")
    assert result.exit_code == 130
    assert "baseline (full) *" in result.stdout and "interrupted" in result.stderr
    assert len(fake_api.runs) == 1
