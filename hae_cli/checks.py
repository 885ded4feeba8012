"""Checks on what a caller gives hae, each turning a mistake into one `HaeError` line that says
what is wrong and what to do: paths (the operating system's refusals in plain words), the
Python API's argument types, policy sizes against the model's context, and numbers that must
be finite (weights, logits).

No torch at import: the CLI runs the path checks before the library loads.
"""

from __future__ import annotations

import errno
import math
import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hae_cli.errors import ConfigError, HaeError, InputError, ResourceError
from hae_cli.user_text import parse_value

NAME_MAX = 255  # bytes in one name of a path (Linux, macOS)
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_URL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:/|data:)", re.IGNORECASE)


# --------------------------------------------------------------------------- paths


def shown(path: str | Path, most: int = 80) -> str:
    """A path as a message shows it: a name too long to read is cut in the middle."""
    text = str(path)
    if len(text) <= most:
        return text
    return f"{text[: most // 2]}...{text[-most // 4:]} ({len(os.fsencode(text)):,} bytes)"


def looks_like_url(text: str) -> bool:
    return bool(_URL.match(text))


def as_url(text: str) -> str:
    """A URL as the user typed it (a `Path` folds "http://" into "http:/")."""
    return re.sub(r"^([a-z][a-z0-9+.-]*):/(?!/)", r"\1://", text, flags=re.IGNORECASE)


def path_status(path: str | Path, what: str) -> os.stat_result | None:
    """`os.stat(path)` (links followed), or None when nothing is there. Any other refusal of the
    operating system is an `InputError` naming `what` ("image", "--model folder") and saying why
    in plain words: a name over 255 bytes, a folder the user cannot enter, a link loop, a link to
    nothing, a file where a folder should be."""
    try:
        return os.stat(path)
    except ValueError:  # an embedded NUL byte
        raise InputError(f"{what} {shown(path)!r} holds a NUL character") from None
    except FileNotFoundError:
        target = _dangling_link(path)
        if target is not None:
            raise InputError(f"{what} not found: {shown(path)} is a symbolic link to {shown(target)}, "
                             "which does not exist") from None
        return None
    except OSError as error:
        raise InputError(os_error_message(error, path, what)) from None


def os_error_message(error: OSError, path: str | Path, what: str) -> str:
    """What an `OSError` on `path` means, in one line."""
    code = error.errno
    if code == errno.ENAMETOOLONG:
        longest = max((len(os.fsencode(part)) for part in Path(path).parts), default=0)
        return (f"cannot open {what} {shown(path)}: file name too long (a name in a path may have at most "
                f"{NAME_MAX} bytes; the longest here has {longest:,})")
    if code in (errno.EACCES, errno.EPERM):
        folder = _folder_not_entered(Path(path))
        where = f"no permission to enter folder {shown(folder)}" if folder is not None else "no permission to read it"
        return f"cannot open {what} {shown(path)}: permission denied ({where})"
    if code == errno.ELOOP:
        return f"cannot open {what} {shown(path)}: a symbolic link loop (links that lead back to each other)"
    if code == errno.ENOTDIR:
        part = _file_as_folder(Path(path))
        why = f"{shown(part)} is a file, not a folder" if part is not None else "a part of it is a file, not a folder"
        return f"{what} not found: {shown(path)} ({why})"
    return f"cannot open {what} {shown(path)}: {error.strerror or error}"


def _dangling_link(path: str | Path) -> str | None:
    try:
        return os.readlink(path) if os.path.islink(path) else None
    except OSError:
        return None


def _folder_not_entered(path: Path) -> Path | None:
    """The first folder on the way to `path` that refuses the user."""
    for parent in reversed(path.parents):
        try:
            os.stat(parent)
            if parent != path and not os.access(parent, os.X_OK):
                return parent
        except PermissionError:
            return parent.parent
        except OSError:
            return None
    return None


def _file_as_folder(path: Path) -> Path | None:
    for parent in reversed(path.parents):
        if os.path.isfile(parent):
            return parent
    return None


def kind_of(status: os.stat_result) -> str:
    """'file', 'folder', 'pipe', 'device' or 'socket'."""
    mode = status.st_mode
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISFIFO(mode):
        return "pipe"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "device"


def check_output_path(path: Path, option: str, suffix: str | None = None) -> None:
    """An output file can be written where it is asked for: checked before the run, not after it."""
    if suffix is not None and path.suffix.lower() != suffix:
        raise InputError(f"{option} writes a {suffix[1:].upper()}: give a file name ending in {suffix}, "
                         f"not {shown(path)!r}")
    status = path_status(path, f"{option} file")
    if status is not None and kind_of(status) == "folder":
        raise InputError(f"{option}: {shown(path)!r} is a folder; give a file name")
    parent = path.parent
    folder = path_status(parent, f"{option} folder")
    if folder is None or kind_of(folder) != "folder":
        raise InputError(f"{option}: folder {shown(parent)!r} does not exist")
    if status is not None and kind_of(status) != "file":
        return  # /dev/null, a pipe: written as they are
    if not os.access(parent, os.W_OK) or (status is not None and not os.access(path, os.W_OK)):
        raise InputError(f"{option}: cannot write {shown(path)!r} (permission denied)")


def _identity(path: str | Path) -> tuple[str, tuple[int, int] | None]:
    """A path's resolved form, and its device and inode where it exists (links, hard links)."""
    try:
        status = os.stat(path)
        return os.path.realpath(path), (status.st_dev, status.st_ino)
    except (OSError, ValueError):
        return os.path.realpath(path), None


def image_inputs(images: Iterable) -> list[tuple[str, Path]]:
    """A run's image files, as `check_outputs` names them ("image 2")."""
    return [(f"image {number}", image) for number, image in enumerate(images, start=1)
            if isinstance(image, (str, Path))]


def model_files(model: str | os.PathLike | None) -> list[tuple[str, Path]]:
    """The files of a local checkpoint folder ("demo": the shipped one), as inputs of a run."""
    if model is None:
        return []
    folder = Path(__file__).resolve().parent / "demo_model" if str(model) == "demo" else Path(model).expanduser()
    try:
        return [("a file of the model", path) for path in folder.iterdir() if path.is_file()]
    except OSError:  # a hub id, or a folder that is not there (the load says so)
        return []


def check_outputs(outputs: Iterable[tuple[str, str | Path]], inputs: Iterable[tuple[str, object]]) -> None:
    """No file a run writes is one of its inputs (an image, the data, a checkpoint's file), nor
    another of its outputs: the same resolved path, or the same file under another name (a link,
    a hard link). Checked before the run, so that nothing the user has is written over.
    `outputs`: (option, path); `inputs`: (what it is, path; anything else is not a file)."""
    written: dict = {}
    for option, path in outputs:
        real, inode = _identity(path)
        earlier = written.get(real) or (written.get(inode) if inode is not None else None)
        if earlier is not None:
            raise InputError(f"{earlier[0]} and {option} would both write {shown(path)}; give each its own file")
        written[real] = (option, path)
        if inode is not None:
            written[inode] = (option, path)
    for what, source in inputs:
        if not isinstance(source, (str, Path)):
            continue
        real, inode = _identity(source)
        hit = written.get(real) or (written.get(inode) if inode is not None else None)
        if hit is not None:
            option, path = hit
            named = "" if str(path) == str(source) else f" ({shown(source)})"
            raise InputError(f"{option} {shown(path)} is {what}{named}, an input of this run: writing there would "
                             "replace it; give another file name")


def optional_extra(module: str, needed_by: str, extra: str) -> None:
    """An optional package a command needs is installed: said before the model loads, not after
    the run (found without importing it)."""
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ConfigError(f"{needed_by} needs {module}, an optional extra: pip install 'hae-cli[{extra}]' "
                          f"(or pip install {module})")


def write_failed(error: OSError, path: str | Path) -> HaeError:
    """A failed write of an output file: a full disk is the machine's (exit 1), anything else the path's."""
    if error.errno in _DISK_FULL:
        return ResourceError(f"cannot write {shown(path)}: {error.strerror}")
    return InputError(f"cannot write {shown(path)}: {error.strerror or error}")


def disk_full(error: OSError) -> bool:
    return error.errno in _DISK_FULL


# --------------------------------------------------------------------------- the Python API's arguments


def model_name(model: object) -> str | os.PathLike:
    """What `load_model` takes: "demo", a folder or a hub id."""
    if not isinstance(model, (str, os.PathLike)):
        raise ConfigError(f"model must be \"demo\", a checkpoint folder or a hub id, got {type(model).__name__}")
    return model


def image_list(images: object, what: str = "images", nonempty: bool = False) -> list:
    """`images` as a list: paths, PIL images, or images the model has read (`read_image`). One
    image where a list is expected, a mapping, a number: each one line saying what to give."""
    from PIL import Image

    single = (str, bytes, os.PathLike, Image.Image)
    if isinstance(images, single):
        raise InputError(f"{what} must be a list of images, got one {type(images).__name__} "
                         f"({shown(images, 60)!r}); write [{shown(images, 60)!r}]")
    if isinstance(images, dict) or not isinstance(images, Iterable):
        raise InputError(f"{what} must be a list of images (paths or PIL images), got {type(images).__name__}")
    items = list(images)
    for number, image in enumerate(items, start=1):
        if isinstance(image, bytes) or not (isinstance(image, single) or hasattr(image, "num_tokens")):
            article = "an" if type(image).__name__[0] in "aeiou" else "a"
            raise InputError(f"image {number} is {article} {type(image).__name__} ({shown(repr(image), 60)}); "
                             "give a path (str or Path) or a PIL image")
    if nonempty and not items:
        raise InputError(f"{what} must hold at least one image")
    return items


def callbacks(**given: object) -> None:
    """Each `on_...=` a caller gives is a function or None: a number there would fail deep in a
    run as a bare `TypeError` ('int' object is not callable)."""
    for name, value in given.items():
        if value is not None and not callable(value):
            raise ConfigError(f"{name} must be a function (or None), got {type(value).__name__} ({shown(repr(value), 40)})")


def flags(**given: object) -> None:
    """Each flag is True or False: 'yes' or 1 is not read as either."""
    for name, value in given.items():
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be True or False, got {type(value).__name__} ({shown(repr(value), 40)})")


def step_number(value: object, name: str) -> None:
    """A decode step (0 = after prefill), or None."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ConfigError(f"{name} must be a decode step, a whole number >= 0 (0 = after prefill), or None; "
                          f"got {value!r}")


def parameter_dict(params: object, what: str = "policy_params") -> dict:
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ConfigError(f"{what} must be a dict of parameter names and values, got {type(params).__name__}")
    return params


# --------------------------------------------------------------------------- numbers as written


_WHOLE = re.compile(r"[+-]?\d+")
_DECIMAL = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?")


def parse_budget(text: str, option: str = "--budget") -> int | float:
    """'512' -> 512 tokens; '0.5' -> half the prompt. Anything else is a `ConfigError` naming
    `option` as the user wrote it (`--budget`, `-p budget`) and saying what is wrong with it."""
    raw = text.strip()
    if _WHOLE.fullmatch(raw):
        tokens = int(raw)
        if tokens <= 0:
            raise ConfigError(f"{option} must be > 0, got {text!r}")
        return tokens
    if not _DECIMAL.fullmatch(raw):
        try:
            float(raw)  # Python reads '1_000', 'inf', 'nan': say what they are, not that they are too big
        except ValueError:
            raise ConfigError(f"{option} must be a token count (e.g. 512) or a fraction of the prompt in (0, 1] "
                              f"(e.g. 0.5), got {text!r}") from None
        if "_" in raw:
            raise ConfigError(f"{option} {text!r}: write the number without '_' (e.g. {raw.replace('_', '')})")
        raise ConfigError(f"{option} must be a finite number: a token count (e.g. 512) or a fraction of the prompt "
                          f"in (0, 1] (e.g. 0.5), got {text!r}")
    fraction = float(raw)
    if not math.isfinite(fraction):  # 1e400
        raise ConfigError(f"{option} {text} is too large to be a number hae can hold; a token count is a whole "
                          "number (e.g. 512), a fraction is in (0, 1]")
    if fraction <= 0:
        raise ConfigError(f"{option} must be > 0, got {text!r}")
    if fraction > 1:
        raise ConfigError(f"{option} {text} is above 1 as a fraction; a fraction must be in (0, 1], a token count "
                          "a whole number (e.g. 512)")
    return fraction


def parse_param_value(name: str, value: str, option: str) -> Any:
    """One policy parameter's value as written (`-p name=value`, or an eval setting's
    `:name=value`): a budget by the budget rule; NaN is no value of any parameter."""
    if name == "budget":
        return parse_budget(value, option)
    parsed = parse_value(value)
    if isinstance(parsed, float) and math.isnan(parsed):
        raise ConfigError(f"{option} must be a number, got {value.strip()!r}")
    return parsed



# --------------------------------------------------------------------------- policy sizes against the context


# The parameters that count tokens. A count past the context holds nothing more than the
# context does, but the cache sizes storage by budget + buffer up front.
TOKEN_COUNTS = ("budget", "buffer", "sink", "recent", "bin_size", "window")
HANDFUL = 16  # a budget that leaves fewer tokens than this per layer is said


def fit_to_context(policy, limits):
    """`policy` with every token count past the context capped at it, and a note for each: before
    any storage is allocated. (policy, notes)"""
    import dataclasses

    changes, notes = {}, []
    for name in TOKEN_COUNTS:
        value = getattr(policy, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > limits.context_tokens:
            changes[name] = limits.context_tokens
            notes.append(f"{name} {value:,} is beyond the {limits.context_tokens:,} tokens {limits.name} attends "
                         f"over: capped at {limits.context_tokens:,}")
    if not changes or not dataclasses.is_dataclass(policy):
        return policy, notes
    return dataclasses.replace(policy, **changes), notes


def small_budget_note(policy, prompt_tokens: int | None) -> list[str]:
    """A note when the budget leaves fewer than a handful of tokens per layer: `1` (a count) and
    `1.0` (the whole prompt) look alike and mean opposite things."""
    budget = getattr(policy, "budget", None)
    if budget is None or isinstance(budget, bool):
        return []
    if isinstance(budget, float):
        if prompt_tokens is None:
            return []
        tokens = max(1, int(budget * prompt_tokens))
    else:
        tokens = budget
    if tokens >= HANDFUL:
        return []
    of = f" of the {prompt_tokens:,}-token prompt" if prompt_tokens else ""
    return [f"budget {budget} keeps {tokens} token{'s' if tokens != 1 else ''} per layer{of}; a whole number "
            "counts tokens, a number with a point is a share of the prompt (0.5 keeps half, 1.0 keeps all of it)"]


# --------------------------------------------------------------------------- finite numbers


def finite_weights(tensors: dict, where: str | Path, file: str | None = None) -> None:
    """Every floating weight is finite, or a `CheckpointError` naming the checkpoint, the first
    weight that is not and its `file`.

    Cheap: one float32 sum per tensor (a NaN or an inf anywhere makes the sum non-finite; at
    memory speed on float32) and one sync for them all; only a sum that is not finite (a bad
    weight, or finite weights summing past float32's range) is confirmed element by element.
    The cost is in docs/BAD_INPUT.md."""
    import torch

    from hae_cli.errors import CheckpointError

    floating = {name: tensor for name, tensor in tensors.items() if tensor.is_floating_point() and tensor.numel()}
    if not floating:
        return
    sums = torch.stack([tensor.sum(dtype=torch.float32).to(next(iter(floating.values())).device)
                        for tensor in floating.values()])
    if bool(torch.isfinite(sums).all()):
        return
    for (name, tensor), total in zip(floating.items(), sums.tolist()):
        if not math.isfinite(total) and not bool(torch.isfinite(tensor).all()):
            source = f" in {file}" if file else ""
            raise CheckpointError(
                f"{where}: weight {name}{source} holds values that are not finite (NaN or inf): the checkpoint is "
                "corrupt; copy or download it again"
            )


def finite_logits(logits, model) -> None:
    """The model's next-token logits are finite, or a `CheckpointError` naming the checkpoint."""
    import torch

    from hae_cli.errors import CheckpointError

    if not bool(torch.isfinite(logits).all()):
        dtype = str(getattr(model, "dtype", "")).removeprefix("torch.")
        overflow = f", or {dtype} overflowed (try --dtype float32)" if dtype in ("float16", "bfloat16") else ""
        raise CheckpointError(
            f"{getattr(model, 'name', 'the model')}: the model's logits are not finite (NaN or inf): its weights "
            f"may be corrupt{overflow}"
        )
