"""Errors a user can act on. Each carries one line that names the problem; the CLI prints it
and exits with the error's `exit_code` (2: bad input; 1: the machine lacks memory or disk
space) instead of showing a traceback."""


class HaeError(Exception):
    """Base for every error the CLI reports as one line."""

    exit_code = 2


class InputError(HaeError):
    """Bad user input: a missing, unreadable or unsupported image, a malformed prompt."""


class ModelNotFoundError(HaeError):
    """The model folder or hub id cannot be found (offline or not downloaded)."""


class CheckpointError(HaeError):
    """A checkpoint that exists but does not match the expected layout or model type."""


class ConfigError(HaeError):
    """A bad parameter value: budget, ratio, layer index, policy name."""


class ResourceError(HaeError):
    """The machine lacks what the run needs: room on the disk for an output, or memory."""

    exit_code = 1
