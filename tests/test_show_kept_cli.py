"""`hae ask/story --show-kept` end to end on the tiny checkpoint: the PNG's evicted cells are the
JSON mask's, the mask's counts are the cache's own per-image counts, and bad --kept-* input is one
line and exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from hae_cli.display.kept_png import layout
from hae_cli.model.phi3v.image import image_cells, image_slot_cells
from cli_runner import invoke
from conftest import TINY_LAYERS
from test_cli_e2e import ok


def evicted_cells(png: np.ndarray, row, cells, count: int) -> set[int]:
    """Slots whose cell is dimmed: an evicted patch fades 78% toward dark grey (max channel < 90),
    while the test images' own colours (white, red 200, blue 200, and their blends) keep one channel >= 200."""
    out = set()
    for slot in range(count):
        x0, y0, x1, y1 = row.cell_box(int(cells.view[slot]), int(cells.row[slot]), int(cells.col[slot]))
        if int(png[(y0 + y1) // 2, (x0 + x1) // 2].max()) < 140:
            out.add(slot)
    return out


def features(mask: str, cells, entry) -> set[int]:
    width = {0: entry["w_crops"] * entry["grid"], 2: entry["grid"]}
    return {s for s in range(len(mask)) if int(cells.view[s]) != 1 and int(cells.col[s]) != width[int(cells.view[s])]}


@pytest.mark.parametrize("command, layer", [("ask", None), ("story", "0")])
def test_png_and_json_agree_with_the_cache(checkpoint, images, tmp_path, command, layer):
    png_path = tmp_path / "kept.png"
    inputs = [images[0], "what color is the shape?"] if command == "ask" else list(images)
    extra = ["--kept-layer", layer] if layer is not None else []
    result = ok(invoke(command, *inputs, "--model", checkpoint, "-n", "5", "--budget", "0.3", "--json",
                       "--show-kept", png_path, *extra))
    payload = json.loads(result.stdout)
    kept, final = payload["kept"], payload["final_cache"]
    drawn = TINY_LAYERS - 1 if layer is None else int(layer)
    assert kept["drawn"] == {"layer": drawn, "path": str(png_path)}
    assert kept["step"] == final["step"]
    assert len(kept["images"]) == len(inputs) - (command == "ask")
    for i, entry in enumerate(kept["images"]):
        for layer_entry, stats in zip(entry["layers"], final["layers"]):
            assert layer_entry["held"] == stats["tokens_by_image"][i] == sum(c in "#" for c in layer_entry["mask"])
            assert layer_entry["in_bin"] == stats["bin_by_image"][i] == layer_entry["mask"].count("b")
    png = np.asarray(Image.open(png_path).convert("RGB"))
    plan = layout([image_cells(e["h_crops"], e["w_crops"], e["grid"]) for e in kept["images"]])
    rows = plan.rows
    assert png.shape[:2] == (plan.height, plan.width)
    for entry, row in zip(kept["images"], rows):
        cells = image_slot_cells(entry["h_crops"], entry["w_crops"], entry["grid"])
        mask = entry["layers"][drawn]["mask"]
        patches = features(mask, cells, entry)
        gone = {s for s in patches if mask[s] == "."}
        assert 0 < len(gone) < len(patches)  # --budget 0.3: some patches go, some stay
        assert evicted_cells(png, row, cells, entry["slots"]) & patches == gone


@pytest.mark.parametrize("args, fragment", [
    (["--show-kept", "{tmp}/kept.png", "--kept-layer", "3"], "--kept-layer 3 is out of range: the model has 3 layers"),
    (["--show-kept", "{tmp}/kept.png", "--kept-step", "3"], "--kept-step 3 is beyond the run"),
    (["--show-kept", "{tmp}/no/kept.png"], "does not exist"),
    (["--show-kept", "{tmp}/kept.jpg"], "ending in .png"),
    (["--kept-layer", "0"], "add --show-kept"),
])
def test_bad_kept_input_is_one_line_and_exit_2(checkpoint, images, tmp_path, args, fragment):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = invoke("ask", images[0], "what?", "--model", checkpoint, "-n", "3", *args)
    assert result.exit_code == 2 and result.stdout == "", result.output
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert fragment in result.stderr
    assert not (tmp_path / "kept.png").exists()


def test_a_step_the_run_never_reached_is_one_line_and_exit_2(checkpoint, images, tmp_path, monkeypatch):
    """A run can end before --kept-step (a stop token): the answer stands, the PNG is not written."""
    from hae_cli.cli import run

    monkeypatch.setattr(run, "check_kept_options", lambda kept, max_new_tokens: None)  # as if it stopped early
    png = tmp_path / "kept.png"
    result = invoke("ask", images[0], "what?", "--model", checkpoint, "-n", "3", "--json",
                    "--show-kept", png, "--kept-step", "7")
    assert result.exit_code == 2, result.output
    assert "kept" not in json.loads(result.stdout)
    assert result.stderr.strip().splitlines()[-1].startswith("error: --kept-step 7 is beyond the run: it ended after")
    assert not png.exists()


def test_profile_draws_one_png_per_policy_of_the_first_prompt(checkpoint, images, tmp_path):
    png, out = tmp_path / "kept.png", tmp_path / "profile.json"
    result = ok(invoke("profile", "--model", checkpoint, "--images", images[0], "--images", images[1],
                       "--question", "what color?", "-c", "snapkv", "--budget", "0.3", "-n", "4",
                       "--json", out, "--show-kept", png, "--kept-step", "0"))
    runs = json.loads(out.read_text())["runs"]
    for name in ("baseline", "hae", "snapkv"):
        path = tmp_path / f"kept_{name}.png"
        assert f"kept patches of {name} written to {path}" in result.stderr
        first, second = runs[name]
        assert first["kept"]["step"] == 0 and "kept" not in second  # the first prompt only
        assert len(first["kept"]["images"]) == 1
    full = runs["baseline"][0]["kept"]["images"][0]
    assert all(set(layer["mask"]) == {"#"} for layer in full["layers"])  # the full cache holds every slot
    assert any("." in layer["mask"] for layer in runs["hae"][0]["kept"]["images"][0]["layers"])
    picture = np.asarray(Image.open(tmp_path / "kept_baseline.png").convert("RGB"))
    row = layout([image_cells(full["h_crops"], full["w_crops"], full["grid"])]).rows[0]
    cells = image_slot_cells(full["h_crops"], full["w_crops"], full["grid"])
    assert evicted_cells(picture, row, cells, full["slots"]) == set()
    assert not png.exists()


@pytest.mark.parametrize("args, fragment", [
    (["--kept-layer", "3"], "--kept-layer 3 is out of range"),
    (["--kept-step", "4"], "--kept-step 4 is beyond the run"),
])
def test_profile_bad_kept_input_is_one_line_and_exit_2(checkpoint, images, tmp_path, args, fragment):
    result = invoke("profile", "--model", checkpoint, "--images", images[0], "--question", "what?", "-n", "4",
                    "--show-kept", tmp_path / "kept.png", *args)
    assert result.exit_code == 2 and result.stdout == "", result.output
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert fragment in result.stderr


def test_profile_says_which_policy_never_reached_the_step(checkpoint, images, tmp_path, monkeypatch):
    from hae_cli.cli import profile

    monkeypatch.setattr(profile, "check_kept_options", lambda kept, max_new_tokens: None)  # as if it stopped early
    result = ok(invoke("profile", "--model", checkpoint, "--images", images[0], "--question", "what?", "-n", "3",
                       "--show-kept", tmp_path / "kept.png", "--kept-step", "7"))
    for name in ("baseline", "hae"):
        assert f"note: {name} not drawn: its run ended after decode step" in result.stderr
        assert not (tmp_path / f"kept_{name}.png").exists()
