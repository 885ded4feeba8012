"""Models shipped by name (`--model demo`, `--model scenes`): each found by its name, held to the
limits its trainer gave it, and a missing one named with how to build it."""

from __future__ import annotations

import pytest

from hae_cli.errors import ConfigError, InputError, ModelNotFoundError


@pytest.fixture
def shipped_scenes(tmp_path, monkeypatch):
    """A tiny 4-crop checkpoint standing where the scenes model ships."""
    from hae_cli.model import loading
    from hae_cli.model.phi3v import checkpoint
    from hae_testing.checkpoints.phi3v import write_tiny_checkpoint

    folder = write_tiny_checkpoint(tmp_path / "scenes_model", num_crops=4)
    monkeypatch.setitem(loading.SHIPPED_MODELS, "scenes", (folder, "the scene world", "scripts/train_scenes_model.py"))
    monkeypatch.setattr(checkpoint, "SCENES_MODEL_DIR", folder)
    return folder


def test_the_scenes_model_is_found_by_name_and_held_to_its_training(shipped_scenes):
    from hae_cli.api import load_model

    loaded = load_model("scenes")
    assert loaded.limits.name == "the scenes model" and loaded.limits.max_crops == 4 and loaded.limits.max_images == 4
    with pytest.raises(ConfigError, match="--num-crops 16: the scenes model was trained with at most 4 crops"):
        load_model("scenes", num_crops=16)
    with pytest.raises(InputError, match="5 images: the scenes model was trained on prompts of at most 4 images"):
        loaded.limits.check_images(5)
    assert load_model("scenes", num_crops=1).limits.max_crops == 4  # fewer crops than trained: allowed


def test_a_shipped_model_that_is_not_installed_says_how_to_build_it(tmp_path, monkeypatch):
    from hae_cli.model import loading

    monkeypatch.setitem(loading.SHIPPED_MODELS, "scenes", (tmp_path / "absent", "the scene world",
                                                           "scripts/train_scenes_model.py"))
    with pytest.raises(ModelNotFoundError, match="the scenes model is not installed at .*; build it with "
                                                 "scripts/train_scenes_model.py"):
        loading.resolve_model_path("scenes")
