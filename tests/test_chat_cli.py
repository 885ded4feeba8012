"""`hae chat` driven as a user drives it: a real process, questions on stdin (or --script), the
demo model answering; commands, Ctrl-C mid-answer, SIGTERM, EOF and bad lines."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time

import pytest

from cli_runner import hae_in_process
from hae_process import HAE, REPO, assert_one_line_error, hae_env

SAMPLES = REPO / "sample_images"
TRIANGLE, CIRCLE, RECTANGLE = (str(SAMPLES / f"easyvqa_test_{n:04d}.png") for n in (63, 198, 394))  # brown, blue, black


def chat(*args: str, stdin: str) -> subprocess.CompletedProcess:
    """A chat fed `stdin` as a pipe feeds it, in-process (the real process's signals, terminal
    and pipes have their own tests below)."""
    return hae_in_process("chat", *args, input=stdin)


def turns_of(result: subprocess.CompletedProcess) -> list[dict]:
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    return json.loads(result.stdout)["turns"]


def test_three_turns_about_two_images_are_answered_right_with_the_full_cache():
    questions = "what shape is in image 1?\nwhat color is the shape in image 2?\nis there a circle in image 1?\n"
    result = chat(TRIANGLE, CIRCLE, "--policy", "full", stdin=questions)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert result.stdout.decode().split() == ["triangle", "blue", "no"]
    assert result.stderr.decode().count("turn ") == 3  # a cache line per turn when stdout is not a terminal

    turns = turns_of(chat(TRIANGLE, CIRCLE, "--policy", "full", "--json", stdin=questions))
    assert [t["text"] for t in turns] == ["triangle", "blue", "no"]
    for before, after in zip(turns, turns[1:]):
        # each turn starts right after the answer before it: the answers stay in the cache
        assert after["start_position"] == before["start_position"] + before["fed_tokens"] + len(before["token_ids"])
        assert after["final_cache"]["layers"][0]["tokens_by_modality"]["generated"] == sum(
            len(t["token_ids"]) for t in turns[: after["turn"]])


def test_images_added_mid_conversation_go_into_the_next_turn():
    stdin = f"what shape is in image 1?\n/images {RECTANGLE}\nwhat shape is in image 3?\nwhat color is the shape in image 3?\n"
    result = chat(TRIANGLE, CIRCLE, "--policy", "full", "--json", stdin=stdin)
    turns = turns_of(result)
    assert [t["text"] for t in turns] == ["triangle", "rectangle", "black"]
    assert turns[1]["images_added"] == [RECTANGLE] and turns[1]["prompt_tokens"]["image"] > 0
    assert json.loads(result.stdout)["images"] == [TRIANGLE, CIRCLE, RECTANGLE]
    assert f"image 3: {RECTANGLE}" in result.stderr.decode()


def test_reset_starts_a_fresh_cache_with_the_same_images():
    stdin = "what shape is in image 1?\n/reset\nwhat shape is in image 2?\n"
    result = chat(TRIANGLE, CIRCLE, "--json", stdin=stdin)
    payload = json.loads(result.stdout)
    first, second = payload["turns"]
    assert payload["resets"] == 1 and (first["conversation"], second["conversation"]) == (1, 2)
    assert second["turn"] == 1 and second["start_position"] == first["start_position"]
    assert second["text"] == "circle"


def test_bad_lines_are_one_line_errors_and_the_conversation_goes_on(tmp_path):
    stdin = f"/bogus\n/images {tmp_path / 'missing.png'}\n/images\n\n   \nwhat shape is in image 2?\n"
    result = chat(TRIANGLE, CIRCLE, stdin=stdin)
    assert result.returncode == 0
    errors = [line for line in result.stderr.decode().splitlines() if line.startswith("error: ")]
    assert len(errors) == 3, result.stderr.decode()
    assert "unknown command /bogus" in errors[0] and "missing.png" in errors[1] and "/images needs" in errors[2]
    assert result.stdout.decode().split() == ["circle"]


def test_eof_before_any_question_ends_cleanly_with_an_empty_json():
    result = chat(TRIANGLE, "--json", stdin="")
    payload = json.loads(result.stdout)
    assert result.returncode == 0 and payload["turns"] == [] and payload["interrupted"] is False
    assert payload["prefill"]["final_cache"]["step"] == 0


def test_script_file_and_its_errors(tmp_path):
    script = tmp_path / "questions.txt"
    script.write_text("what color is the shape in image 2?\n/quit\nwhat shape is in image 1?\n")
    result = hae_in_process("chat", TRIANGLE, CIRCLE, "--policy", "full", "--script", script)
    assert result.returncode == 0 and result.stdout.decode().split() == ["blue"]  # /quit ends it
    # one image is shown as `hae ask` shows it, so easy-VQA's own wording works
    script.write_text("what color is the shape?\nis there a triangle in the image?\n")
    result = hae_in_process("chat", TRIANGLE, "--script", script)
    assert result.returncode == 0 and result.stdout.decode().split() == ["brown", "yes"]
    assert_one_line_error(hae_in_process("chat", TRIANGLE, "--script", tmp_path / "none.txt"), "cannot read --script")
    script.write_bytes(b"\xff\xfe bad")
    assert_one_line_error(hae_in_process("chat", TRIANGLE, "--script", script), "not UTF-8")
    assert_one_line_error(hae_in_process("chat"), "Missing argument 'IMAGE'")


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([HAE, "chat", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=hae_env(), cwd=REPO)


def _wait_for(stream, needle: bytes, timeout: float = 120) -> bytes:
    """Read `stream` (unbuffered) until `needle` appears."""
    seen, deadline = b"", time.monotonic() + timeout
    while needle not in seen:
        ready, _, _ = select.select([stream], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"timed out waiting for {needle!r}; got {seen[-500:]!r}")
        chunk = os.read(stream.fileno(), 4096)
        if not chunk:
            raise AssertionError(f"stream ended before {needle!r}; got {seen[-500:]!r}")
        seen += chunk
    return seen


def test_ctrl_c_stops_the_answer_and_the_conversation_goes_on():
    # eight images to caption: an answer long enough to be cut after its first word
    process = _start(*[TRIANGLE, CIRCLE, RECTANGLE] * 2, TRIANGLE, CIRCLE, "--policy", "full", "-n", "200")
    try:
        process.stdin.write(b"describe each image in order.\n")
        process.stdin.flush()
        head = _wait_for(process.stdout, b"image")
        process.send_signal(signal.SIGINT)
        _wait_for(process.stderr, b"answer stopped")
        rest, stderr = process.communicate(b"what shape is in image 3?\n", timeout=120)
    finally:
        process.kill()
    lines = (head + rest).decode().splitlines()
    assert process.returncode == 0, stderr.decode()[-2000:]
    assert len(lines) == 2 and lines[1] == "rectangle", lines
    assert len(lines[0]) < len("image 1: a brown triangle. image 2: a blue circle. image 3: a black rectangle.")


def test_sigterm_while_waiting_ends_the_conversation_with_its_json():
    process = _start(TRIANGLE, CIRCLE, "--json")
    try:
        process.stdin.write(b"what shape is in image 2?\n")
        process.stdin.flush()
        _wait_for(process.stderr, b"turn 1:")
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, stderr.decode()[-2000:]
    payload = json.loads(stdout)
    assert payload["interrupted"] is True and [t["text"] for t in payload["turns"]] == ["circle"]
    assert "conversation ended (SIGTERM)" in stderr.decode()


@pytest.mark.parametrize("flag", ["--help"])
def test_help_teaches_the_commands(flag):
    result = hae_in_process("chat", flag, COLUMNS="200")
    text = result.stdout.decode()
    assert result.returncode == 0
    for command in ("/images", "/reset", "/stats", "/quit", "Ctrl-C", "--script"):
        assert command in text, command


def test_on_a_terminal_a_prompt_the_panel_between_turns_and_ctrl_c_at_the_prompt():
    import pty

    pid, fd = pty.fork()
    if pid == 0:  # the child: hae chat on the terminal
        os.chdir(REPO)
        os.execve(str(HAE), [str(HAE), "chat", TRIANGLE, CIRCLE], {**hae_env(), "COLUMNS": "120", "LINES": "60", "TERM": "xterm"})

    def read_until(needle: bytes, timeout: float = 120) -> bytes:
        seen, deadline = b"", time.monotonic() + timeout
        while needle not in seen:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"timed out waiting for {needle!r}; got {seen[-800:]!r}"
            try:
                seen += os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
        return seen

    try:
        assert b"/help lists the commands" in read_until(b"you> ")
        os.write(fd, b"what shape is in image 1?\r")
        turn = read_until(b"you> ")
        for part in (b"per image (tokens held)", b"per layer", b"turn 1", b"KV cache"):
            assert part in turn, turn[-1500:]
        # Ctrl-C at the prompt clears the line; the conversation goes on. Sent once readline waits:
        # a SIGINT between its prompt and its select() is only seen at the next key (CPython's readline).
        time.sleep(0.5)
        os.write(fd, b"\x03")
        assert b"/quit or Ctrl-D ends the conversation" in read_until(b"you> ")
        os.write(fd, b"/quit\r")
        read_until(b"\x00", timeout=60)
    finally:
        status = _reap(pid)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0


def _reap(pid: int, grace: float = 10) -> int:
    """The child's wait status; a child still running after `grace` seconds (a step that failed
    left it waiting) is killed rather than waited on forever."""
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]
