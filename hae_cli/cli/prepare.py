"""What every run command (`ask`, `story`, `chat`) does before its own work: check what can be
checked before the model loads (sampling, the policy and its parameters, every image), then
load the model with a spinner, both interruptible (Ctrl-C there leaves one JSON document under
--json and exits 128 + the signal)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hae_cli.cli.options import RunOptions
from hae_cli.cli.output import interruptible, library, progress_on_stderr
from hae_cli.cli.validate import check_images, check_policy_name, check_sampling, checked_policy
from hae_cli.errors import InputError


@dataclass
class Checked:
    """A run's inputs, checked: the policy (built once), and the library, imported."""

    policy: object  # Policy
    api: object  # the hae_cli.api module

    @property
    def buffer(self) -> int | None:
        """The policy's buffer: a layer holds up to budget + buffer before a round."""
        return getattr(self.policy, "buffer", None)


def check_run(command: str, options: RunOptions, images: Sequence[Path], nothing: dict | None) -> Checked:
    """Sampling, images present, the policy, every image decoded: all before the model loads.
    The libraries (torch, transformers: seconds) are imported here, under a spinner."""
    check_sampling(options)
    if not images:
        raise InputError(f"`{command}` needs at least one image")
    with progress_on_stderr() as progress:
        progress(LOADING_LIBRARIES)
        return interruptible(lambda: _checks(options, images), nothing)


LOADING_LIBRARIES = "loading hae's libraries (torch, transformers)"


def _checks(options: RunOptions, images: Sequence[Path]) -> Checked:
    policy = checked_policy(check_policy_name(options.policy), options.policy_args)
    check_images(images)
    return Checked(policy, library())


def load(checked: Checked, options: RunOptions, progress, nothing: dict | None):
    """The model, loaded with `progress` told what is being read."""
    return interruptible(lambda: checked.api.load_model(options.model, options.device, options.dtype,
                                                       on_progress=progress, image_options=options.load_options()),
                         nothing)
