"""hae eval's promises about its own run: --strict opens every image before anything runs; the
workers asked for are capped by the items, the cores and the memory there are, in one note; the
summary says nothing misleading (no cut "within" a full cache that answers nothing, a drop
shown as a drop, a resumed count of the data's items only)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hae_cli import cli

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "sample_images" / "easyvqa_test_0698.png"


def invoke(*args):
    return CliRunner().invoke(cli.app, [str(a) for a in args])


def one_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def records(folder: Path, *lines: dict) -> Path:
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.mark.parametrize("make, fragment", [
    (lambda path: path.write_bytes(SAMPLE.read_bytes()[:300]), "truncated"),
    (lambda path: path.write_text("not a picture"), "not an image"),  # not named in the issue
], ids=["truncated", "text named .png"])
def test_strict_opens_every_image_before_anything_runs(tmp_path, make, fragment):
    make(tmp_path / "bad.png")
    shutil.copy(SAMPLE, tmp_path / "good.png")
    data = records(tmp_path, {"image": "good.png", "question": "what color is the shape?"},
                   {"images": ["good.png", "bad.png"], "question": "what shape is in image 1?"})
    line = one_error(invoke("eval", data, "--strict", "--out", tmp_path / "run"), "data.jsonl line 2", fragment)
    assert "drop --strict" in line
    assert not (tmp_path / "run").exists()  # refused before anything was written
