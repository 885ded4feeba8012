"""Hostile input driven through the real `hae` command in a subprocess, class by class (the
table in docs/BAD_INPUT.md): each ends as one `error:` line with exit code 2, a note, or a kept
result; never a traceback. Cheap checks fail before the model loads, so most of these take a
fraction of a second; the ones that need a run use the shipped demo model or a tiny checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from cli_runner import hae_in_process
from hae_process import REPO, SAMPLE, assert_one_line_error, start_hae


# ----------------------------------------------------------------------------- 1. text that is not valid Unicode


@pytest.mark.parametrize("args", [
    [b"ask", SAMPLE, b"what \xff\xfe color"],  # bytes that are not UTF-8
    [b"ask", SAMPLE, b"what \xed\xa0\x80 color"],  # a UTF-8-encoded surrogate
    [b"story", SAMPLE, b"--prompt", b"describe \xc3\x28 them"],  # a broken two-byte sequence
    [b"profile", b"--images", SAMPLE, b"--question", b"\x80what color?"],
    [b"profile", b"--images", SAMPLE, b"--images", SAMPLE, b"--task", b"story", b"-q", b"caption\xfe"],
], ids=["ask-question", "ask-surrogate-bytes", "story-prompt", "profile-question", "profile-story-prompt"])
def test_text_that_is_not_utf8_is_one_line(args):
    line = assert_one_line_error(hae_in_process(*args), "not valid UTF-8")
    assert "at character" in line


@pytest.mark.parametrize("entry, fragment", [
    ({"image": "a.png", "question": "what \ud800 color?"}, "entry 1 question is not valid Unicode"),
    ({"image": "a.png", "question": "what color?", "answer": "\udfff"}, "entry 1 answer is not valid Unicode"),
    ({"images": ["a.png"], "task": "story", "question": "x\udc80"}, "entry 1 question is not valid"),
])
def test_workload_file_with_lone_surrogates_is_one_line(tmp_path, entry, fragment):
    (tmp_path / "a.png").write_bytes(SAMPLE.read_bytes())
    (tmp_path / "questions.json").write_text(json.dumps([entry]), encoding="ascii")  # \ud800 escapes
    assert_one_line_error(hae_in_process("profile", "--samples", tmp_path), fragment)


def test_workload_file_that_is_not_utf8_is_one_line(tmp_path):
    (tmp_path / "questions.json").write_bytes(b'[{"image": "a.png", "question": "what \xff color?"}]')
    assert_one_line_error(hae_in_process("profile", "--samples", tmp_path), "cannot read", "questions.json")


def test_the_library_checks_the_same_text(tiny_checkpoint):
    """`api.run` (no CLI in front) refuses the same text with the same line."""
    from hae_cli import api
    from hae_cli.errors import InputError

    loaded = api.load_model(str(tiny_checkpoint))
    for task, text in (("ask", "what \udcff color"), ("story", "caption \ud800")):
        with pytest.raises(InputError, match="not valid"):
            api.run(loaded, [SAMPLE], text, task=task, max_new_tokens=1)


# ----------------------------------------------------------------------------- 3. a signal keeps what was generated


@pytest.fixture(scope="module")
def endless_checkpoint(tmp_path_factory) -> Path:
    """A random tiny model that, under the full cache, does not stop on its own for thousands of
    tokens (seed 1, 3 layers), so a signal always arrives mid-generation."""
    from hae_testing.checkpoints.phi3v import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("endless"), seed=1, text=dict(num_hidden_layers=3))


ENDLESS = ("--policy", "full", "-n", "1000000")


def _first_output_then(process, signum: int, timeout: float = 90) -> tuple[bytes, bytes, float]:
    """Wait for the first byte on stdout (the answer is streaming), send `signum`, collect the rest."""
    import os
    import select
    import time

    start = time.monotonic()
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    assert ready, "no output before the timeout"
    first = os.read(process.stdout.fileno(), 1)
    waited = time.monotonic() - start
    process.send_signal(signum)
    out, err = process.communicate(timeout=60)
    return first + out, err, waited


@pytest.fixture(scope="module")
def seconds_to_stream(endless_checkpoint) -> float:
    """How long a plain run takes to stream its first byte here: runs with nothing to watch
    (--json) are signalled after twice that, so that tokens have been generated."""
    import signal

    plain = start_hae("ask", SAMPLE, "what color is the shape?", "--model", endless_checkpoint, *ENDLESS)
    return _first_output_then(plain, signal.SIGTERM)[2]


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_a_signal_mid_generation_keeps_the_answer_and_the_summary(endless_checkpoint, signame):
    import signal

    signum = getattr(signal, signame)
    process = start_hae("ask", SAMPLE, "what color is the shape?", "--model", endless_checkpoint, *ENDLESS)
    out, err, _ = _first_output_then(process, signum)
    text, stderr = out.decode(), err.decode()
    assert process.returncode == 128 + signum, stderr[-2000:]
    assert "policy full  interrupted" in text and "KV cache" in text and "speed" in text, text[-2000:]
    assert "Traceback" not in stderr and "interrupted" in stderr
    if signame != "SIGINT":
        assert f"({signame})" in stderr


def test_sigterm_under_json_prints_the_partial_result(endless_checkpoint, seconds_to_stream):
    """Nothing streams under --json, so wait for the time the plain run took to stream, twice over."""
    import signal
    import time

    process = start_hae("ask", SAMPLE, "what color is the shape?", "--model", endless_checkpoint, *ENDLESS, "--json")
    time.sleep(2 * seconds_to_stream + 2)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 143, err.decode()[-2000:]
    payload = json.loads(out)
    assert payload["interrupted"] is True and len(payload["token_ids"]) > 0 and payload["text"]
    assert payload["timings"]["decode_tokens"] == len(payload["token_ids"])


def test_sigterm_during_profile_writes_the_json_file(endless_checkpoint, seconds_to_stream, tmp_path):
    import signal
    import time

    out_file = tmp_path / "profile.json"
    process = start_hae("profile", "--images", SAMPLE, "-q", "what color is the shape?", "--model",
                        endless_checkpoint, "-n", "1000000", "--json", out_file)
    time.sleep(2 * seconds_to_stream + 2)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 143, err.decode()[-2000:]
    payload = json.loads(out_file.read_text())
    assert payload["interrupted"] is True
    assert len(payload["runs"]["baseline"][0]["token_ids"]) > 0
    assert "baseline (full) *" in out.decode() and "(SIGTERM)" in err.decode()


# ----------------------------------------------------------------------------- 2. a config the loader cannot build


def _leaves(section: dict, prefix: tuple = ()):
    for key, value in section.items():
        if isinstance(value, dict):
            yield from _leaves(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def _with(raw: dict, path: tuple, value) -> dict:
    copy = json.loads(json.dumps(raw))
    section = copy
    for key in path[:-1]:
        section = section[key]
    section[path[-1]] = value
    return copy


def _hostile_values(value) -> list:
    if isinstance(value, bool):
        return ["yes", 3]
    if isinstance(value, int):
        return [value * 2, 0, -1, 1.5, "x", None, 10**12]
    if isinstance(value, float):
        return [value * 2, -1.0, float("nan"), "x", None]
    if isinstance(value, list):
        return [value[:-1], [], "x", None, ["x"] * len(value)]
    return [3, None, "nonsense"]


def test_every_config_field_made_hostile_builds_a_model_or_is_one_line_naming_it(tiny_checkpoint):
    """Each field of a real checkpoint's config.json, given a wrong type, zero, a negative, a
    doubled or an absurd value: the config either builds a model (on the meta device) or fails
    as one `CheckpointError` line that names the field (or, for sizes that the weights then
    contradict, the weight and the sizes to check)."""
    import torch

    from hae_cli.errors import CheckpointError
    from hae_cli.model.phi3v.config import ModelConfig
    from hae_cli.model.phi3v.network import Phi3VForCausalLM

    raw = json.loads((tiny_checkpoint / "config.json").read_text())
    refused = 0
    for path, value in _leaves(raw):
        for bad in _hostile_values(value):
            try:
                config = ModelConfig.from_dict(_with(raw, path, bad), source="tiny")
                if path[-1] == "num_hidden_layers" and bad == 10**12:
                    continue  # the loader refuses it against the weights (next test), before building
                with torch.device("meta"):
                    Phi3VForCausalLM(config)
            except CheckpointError as error:
                refused += 1
                message = str(error)
                assert "\n" not in message and len(message) < 400, message
                assert path[-1] in message or path[-2:-1] and path[-2] in message, (path, bad, message)
    assert refused > 100


@pytest.mark.parametrize("field, value, fragments", [
    ("hidden_size", "double", ("hidden_size", "rope_scaling.long_factor")),  # the example
    ("num_hidden_layers", 10**9, ("num_hidden_layers", "weights hold")),  # would take forever to build
    ("intermediate_size", "double", ("intermediate_size", "weight")),
    ("hidden_act", "swishy", ("hidden_act",)),
    ("num_key_value_heads", 3, ("num_key_value_heads",)),
])
def test_a_config_the_loader_cannot_build_is_one_line_through_the_cli(tiny_checkpoint, tmp_path, field, value, fragments):
    import shutil

    folder = tmp_path / "bad_checkpoint"
    shutil.copytree(tiny_checkpoint, folder)
    raw = json.loads((folder / "config.json").read_text())
    raw[field] = raw[field] * 2 if value == "double" else value
    (folder / "config.json").write_text(json.dumps(raw))
    assert_one_line_error(hae_in_process("ask", SAMPLE, "what color?", "--model", folder), "config.json", *fragments)


# ----------------------------------------------------------------------------- 6. what the checkpoint was not built for


SAMPLES = sorted((SAMPLE.parent).glob("easyvqa_test_*.png"))


def test_more_crops_than_the_demo_model_was_trained_with_is_refused():
    assert_one_line_error(hae_in_process("ask", SAMPLE, "what color is the shape?", "--num-crops", "100"),
                          "--num-crops 100", "the demo model was trained with at most 1 crop")


def test_more_crops_than_phi35v_was_trained_with_is_refused(endless_checkpoint):
    assert_one_line_error(hae_in_process("ask", SAMPLE, "what?", "--model", endless_checkpoint, "--num-crops", "17"),
                          "--num-crops 17", "at most 16 crops")


def test_a_story_longer_than_the_demo_model_was_trained_on_is_refused():
    from hae_cli.model.phi3v.limits import DEMO_MODEL_MAX_IMAGES

    images = (SAMPLES * 10)[: DEMO_MODEL_MAX_IMAGES + 1]
    assert_one_line_error(hae_in_process("story", *images), f"{len(images)} images",
                          f"at most {DEMO_MODEL_MAX_IMAGES} images")


def test_the_demo_model_limits_are_those_of_its_training_script():
    """If the trainer changes what the demo model sees, these constants must follow."""
    import importlib.util

    from hae_cli.model.phi3v.limits import DEMO_MODEL_CROPS, DEMO_MODEL_MAX_IMAGES

    spec = importlib.util.spec_from_file_location("train_demo_model", REPO / "scripts" / "train_demo_model.py")
    trainer = sys.modules.setdefault(spec.name, importlib.util.module_from_spec(spec))
    spec.loader.exec_module(trainer)
    assert (DEMO_MODEL_CROPS, DEMO_MODEL_MAX_IMAGES) == (trainer.NUM_CROPS, max(trainer.STORY_SIZES))


def test_a_prompt_past_the_context_is_refused_saying_how_long_it_is():
    question = "what color is the shape? " * 800  # about 20,000 characters
    line = assert_one_line_error(hae_in_process("ask", SAMPLE, question), "the prompt is", "tokens",
                                 "the demo model attends over at most 4,096")
    assert "shorten the question" in line


def test_an_answer_past_the_context_is_capped_with_a_note():
    result = hae_in_process("ask", SAMPLE, "what color is the shape?", "-n", "5000", "--json")
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    payload = json.loads(result.stdout)
    prompt = sum(payload["prompt_tokens"].values())
    note = f"--max-new-tokens 5000 capped at {4096 - prompt}"
    assert any(n.startswith(note) for n in payload["notes"]) and f"note: {note}" in result.stderr.decode()


def test_an_empty_answer_says_why(tiny_loaded, tiny_checkpoint):
    """A model whose first token ends its turn: the result carries a note instead of silence."""
    from hae_cli import api

    loaded = api.load_model(str(tiny_checkpoint))
    first = api.run(loaded, [SAMPLE], "what color?", max_new_tokens=1).token_ids[0]
    loaded.__class__ = type("EndsAtOnce", (type(loaded),), {"stop_ids": property(lambda self: {first})})
    result = api.run(loaded, [SAMPLE], "what color?", max_new_tokens=8)
    assert result.text == "" and result.stopped_by == "stop_token"
    assert any(note.startswith("no answer: the model ended its turn at once") for note in result.notes)


# ----------------------------------------------------------------------------- 10. version, help, checks before the load


def test_version():
    from importlib.metadata import version

    result = hae_in_process("--version")
    assert result.returncode == 0 and result.stdout.decode().strip() == f"hae {version('hae-cli')}"


@pytest.mark.parametrize("command", [[], ["ask"], ["story"], ["profile"], ["policies"]])
def test_help_shows_no_type_for_flags(command):
    result = hae_in_process(*command, "--help", COLUMNS="140")
    text = result.stdout.decode()
    assert result.returncode == 0 and "--help" in text
    assert "<bool>" not in text and "BOOLEAN" not in text


@pytest.mark.parametrize("args, fragment", [
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "nan"], "--top-p must be in (0, 1]"),
    (["--temperature", "inf"], "--temperature must be a finite number"),
    (["--seed", str(2**70), "-t", "1"], "--seed must be a whole number"),
    (["--visual-keep", "2"], "--visual-keep must be a fraction in (0, 1]"),
    (["--visual-keep", "0"], "--visual-keep must be a fraction in (0, 1]"),
    (["--visual-keep", "nan"], "--visual-keep must be a fraction in (0, 1]"),
    (["--score-layer", "-1"], "--score-layer"),
    (["--budget", "0"], "--budget must be > 0"),
    (["-n", "0"], "--max-new-tokens"),
])
def test_options_that_need_no_model_fail_before_the_library_is_imported(args, fragment):
    """The check runs before torch is even imported, let alone the model loaded."""
    script = (
        "import sys\n"
        "from hae_cli.cli import main\n"
        f"sys.argv = ['hae', 'ask', {str(SAMPLE)!r}, 'what color?', *{args!r}]\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    code = exit.code\n"
        "print('torch imported' if 'torch' in sys.modules else 'no torch', code)\n"
    )
    import subprocess

    from hae_process import hae_env

    result = subprocess.run([sys.executable, "-c", script], capture_output=True, env=hae_env(), timeout=60)
    assert result.stdout.decode().split() == ["no", "torch", "2"], result.stderr.decode()[-2000:]
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines


# ----------------------------------------------------------------------------- 8, 9. what the help and `hae policies` say


def test_every_policy_parameter_is_listed_with_its_default_and_a_meaning():
    import dataclasses

    from hae_cli.cache.policies import POLICIES, parameter_help

    meanings = {name: parameter_help(cls) for name, cls in POLICIES.items()}
    text = hae_in_process("policies", COLUMNS="400").stdout.decode()
    lines = [" ".join(line.replace("│", " ").split()) for line in text.splitlines()]
    for name, cls in POLICIES.items():
        for field in dataclasses.fields(cls):
            meaning = meanings[name].get(field.name, "")
            assert len(meaning.split()) >= 2 and "as in `" not in meaning, (name, field.name, meaning)
            row = f"{field.name} = {field.default!r} {' '.join(meaning.split())}"
            assert any(row in line for line in lines), (name, row)
    assert "budget + buffer" in text


def test_budget_and_num_crops_help_say_what_they_do():
    text = " ".join(hae_in_process("ask", "--help", COLUMNS="400").stdout.decode().replace("│", " ").split())
    assert "budget + the policy's buffer" in text and "evicts it back to the budget" in text
    assert "fewer crops, fewer image tokens" not in text and "more crops, more image tokens" in text


def test_the_story_help_example_shows_restores():
    """The example `hae story --help` gives for watching the bin restore does restore."""
    import shlex

    text = hae_in_process("story", "--help", COLUMNS="400").stdout.decode()
    line = next(line for line in text.splitlines() if "watch tokens go to the bin" in line)
    args = shlex.split(line.split("(")[0])[2:]  # drop "hae story"
    payload = json.loads(hae_in_process("story", *args, "--json").stdout)
    assert any(event["action"] == "restored" for event in payload["events"]), args


def test_no_machine_paths_in_the_code_or_docs():
    """Paths point inside the repository."""
    import re

    pattern = re.compile(r"/(?:work|home|root|tmp|Users)/[\w.-]+")
    checked = [REPO / "README.md", *REPO.glob("docs/*.md"), *REPO.glob("hae_cli/**/*.py"), *REPO.glob("tests/*.py"),
               *REPO.glob("benchmarks/*.py"), *REPO.glob("benchmarks/*.md"), *REPO.glob("scripts/*.py")]
    found = [
        f"{path.relative_to(REPO)}: {match.group()}"
        for path in checked
        if path.name != "test_bad_input.py"
        for match in pattern.finditer(path.read_text(encoding="utf-8"))
    ]
    assert found == []


# ----------------------------------------------------------------------------- 13. the README in any POSIX shell


def test_the_readme_commands_name_files_that_exist_without_bash_expansion():
    """Split as a POSIX shell splits them (no brace expansion), the README's `hae` lines name
    only sample files that exist."""
    import re
    import shlex

    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    commands = []
    for block in blocks:
        joined = block.replace("\\\n", " ")
        commands += [line.split("#")[0] for line in joined.splitlines() if line.strip().startswith("hae ")]
    named = [word for command in commands for word in shlex.split(command) if word.startswith("sample_images/")]
    assert named, commands
    # a glob (sample_images/*.png) is expanded by every POSIX shell; braces are not
    assert [word for word in named if not [p for p in REPO.glob(word) if p.is_file()]] == []
    assert "docs/BAD_INPUT.md" in text and (REPO / "docs" / "BAD_INPUT.md").is_file()
