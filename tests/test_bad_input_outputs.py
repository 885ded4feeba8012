"""No file hae writes is one of its inputs: `--show-kept`, `--plot`, `--json FILE`, profile's
per-policy pictures and hae eval's --out files are compared with every image, the data and
the model's files (resolved paths, and device and inode: a symbolic or a hard link is the same
file), and with each other, before anything loads. The input is left as it was, byte for byte."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from cli_runner import invoke, one_error

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "sample_images" / "easyvqa_test_0698.png"
OTHER = REPO / "sample_images" / "easyvqa_test_0063.png"




@pytest.fixture
def picture(tmp_path) -> Path:
    path = tmp_path / "photo.png"
    shutil.copy(SAMPLE, path)
    return path


def cases(picture: Path) -> dict:
    tmp = picture.parent
    (tmp / "hard.png").hardlink_to(picture)
    (tmp / "soft.png").symlink_to(picture)
    shutil.copy(picture, tmp / "photo_hae.png")
    return {
        "ask": (["ask", picture, "what color is the shape?", "--show-kept", picture], "is image 1"),
        "story": (["story", OTHER, picture, "--show-kept", picture], "is image 2"),
        "hard link": (["ask", picture, "what color?", "--show-kept", tmp / "hard.png"], "is image 1"),
        "symbolic link": (["ask", tmp / "soft.png", "what color?", "--show-kept", picture], "is image 1"),
        "profile --plot": (["profile", "--images", picture, "-q", "what?", "--plot", picture], "--plot"),
        "profile --json": (["profile", "--images", picture, "-q", "what?", "--json", picture], "--json"),
        "profile's per-policy picture": (["profile", "--images", tmp / "photo_hae.png", "-q", "what?",
                                          "--show-kept", picture], ("photo_hae.png", "is image 1")),
    }


@pytest.mark.parametrize("case", ["ask", "story", "hard link", "symbolic link", "profile --plot", "profile --json",
                                  "profile's per-policy picture"])
def test_an_output_over_an_input_image_is_refused_and_the_image_kept(picture, case):
    before = picture.read_bytes()
    args, fragments = cases(picture)[case]  # a long path is shortened in the line: its name and its role apart
    one_error(invoke(*args), "an input of this run", *([fragments] if isinstance(fragments, str) else fragments))
    assert picture.read_bytes() == before


def test_two_outputs_of_one_run_onto_one_file_are_refused(tmp_path):
    line = one_error(invoke("profile", "--images", SAMPLE, "-q", "what?", "--show-kept", tmp_path / "k.png",
                            "--plot", tmp_path / "k_hae.png"), "would both write")
    assert "--plot" in line and "--show-kept" in line


def test_eval_out_files_over_the_data_or_its_images_are_refused(tmp_path):
    shutil.copy(SAMPLE, tmp_path / "accuracy.png")
    data = tmp_path / "data.jsonl"
    data.write_text('{"image": "accuracy.png", "question": "what color is the shape?"}\n')
    one_error(invoke("eval", data, "--out", tmp_path), "accuracy.png", "is an image of data.jsonl line 1")
    assert (tmp_path / "accuracy.png").read_bytes() == SAMPLE.read_bytes()
    assert not (tmp_path / "config.json").exists()
    listed = tmp_path / "summary.json"
    listed.write_text('[{"image": "accuracy.png", "question": "what color is the shape?"}]')
    before = listed.read_bytes()
    one_error(invoke("eval", listed, "--out", tmp_path, "--no-plot"), "summary.json", "is the data")
    assert listed.read_bytes() == before


def test_eval_out_into_the_model_folder_is_refused(tmp_path):
    """Not named in the issue: --out the checkpoint's folder would write config.json over its own."""

    folder = tmp_path / "ckpt"
    shutil.copytree(REPO / "hae_cli" / "demo_model", folder)
    before = (folder / "config.json").read_bytes()
    one_error(invoke("eval", REPO / "sample_images", "--model", folder, "--out", folder, "--limit", "1"),
              "config.json", "is a file of the model")
    assert (folder / "config.json").read_bytes() == before


def test_a_file_of_the_model_folder_is_an_input(tmp_path):
    from hae_cli.checks import check_outputs, model_files
    from hae_cli.errors import InputError

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "preview.png").write_bytes(b"x")
    with pytest.raises(InputError, match="a file of the model"):
        check_outputs([("--show-kept", folder / "preview.png")], model_files(str(folder)))
    assert any(path.name == "config.json" for _, path in model_files("demo"))
    check_outputs([("--show-kept", tmp_path / "kept.png")], model_files(str(folder)))  # elsewhere: fine
    assert os.path.exists(folder / "preview.png")
