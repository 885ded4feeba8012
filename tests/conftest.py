"""Shared fixtures: tiny checkpoints in the exact official layout, written once per session."""

from pathlib import Path

import pytest
import torch

# The test tensors are small: a second thread mostly spins, and on a shared 2-core
# machine one thread runs the suite several times faster. One setting for every test.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from hae_testing.checkpoints.phi3v import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "phi35v-tiny", seed=0, num_crops=1)


@pytest.fixture(scope="session")
def tiny_loaded(tiny_checkpoint):
    from hae_cli.model.phi3v.checkpoint import load_checkpoint

    return load_checkpoint(tiny_checkpoint)
