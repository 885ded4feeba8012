"""Shared fixtures: tiny checkpoints in the exact official layout, written once per session; the
demo model, loaded once; and the random tiny Phi-3 the cache tests decode with."""

from pathlib import Path

import pytest
import torch

# The test tensors are small: a second thread mostly spins, and on a shared 2-core
# machine one thread runs the suite several times faster. One setting for every test.
torch.set_num_threads(1)

TINY_LAYERS = 3  # the `checkpoint` fixture's depth


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from hae_testing.checkpoints.phi3v import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "phi35v-tiny", seed=0, num_crops=1)


@pytest.fixture(scope="session")
def tiny_loaded(tiny_checkpoint):
    from hae_cli.model.phi3v.checkpoint import load_checkpoint

    return load_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="session")
def demo():
    """The shipped demo model, loaded once for every test that runs it in-process."""
    from hae_cli.api import load_model

    return load_model("demo")


@pytest.fixture(scope="module")
def lm():
    """A random tiny Phi-3 (`cache_helpers.tiny_lm`), one per test module."""
    from cache_helpers import tiny_lm

    return tiny_lm()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A random 3-layer Phi-3.5-V checkpoint (seed 1: its greedy answers do not stop at once, so
    decoding is exercised), for the commands driven end to end."""
    from hae_testing.checkpoints.phi3v import write_tiny_checkpoint

    folder = tmp_path_factory.mktemp("tiny_phi3v")
    write_tiny_checkpoint(folder, seed=1, text=dict(num_hidden_layers=TINY_LAYERS))
    return folder


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> list[Path]:
    """Two small pictures of different sizes and colours."""
    from PIL import Image, ImageDraw

    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, (size, colour) in enumerate((((300, 200), (200, 30, 30)), ((200, 260), (30, 30, 200)))):
        image = Image.new("RGB", size, (255, 255, 255))
        ImageDraw.Draw(image).ellipse((40, 40, 160, 160), fill=colour)
        paths.append(folder / f"shape_{i}.png")
        image.save(paths[-1])
    return paths
