"""Find a checkpoint (a folder, a shipped model, or a hub id: the local Hugging Face cache first,
downloaded only when it is missing and HF_HUB_OFFLINE is not set), pick the device and dtype, and
hand the folder to its family.

The family is read from `config.json`'s `model_type`; each family loads its own checkpoint
(`phi3v/checkpoint.py`, ...) strictly, before anything runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from hae_cli.checks import as_url, kind_of, looks_like_url, path_status
from hae_cli.errors import CheckpointError, ConfigError, ModelNotFoundError

DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "demo_model"
SCENES_MODEL_DIR = Path(__file__).resolve().parent.parent / "scenes_model"
# The models that ship with the package: --model NAME, what each was trained on, and how it is rebuilt.
SHIPPED_MODELS = {
    "demo": (DEMO_MODEL_DIR, "easy-VQA: one shape on a plain 64x64 image (1 crop)", "scripts/train_demo_model.py"),
    "scenes": (SCENES_MODEL_DIR, "the scene world: 3-12 labelled objects on 672x672 images (4 crops)",
               "scripts/train_scenes_model.py"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(model: str) -> Path:
    """A local folder, a shipped model's name ("demo", "scenes"), or a hub id found in the local
    HF cache.

    With HF_HUB_OFFLINE set nothing is downloaded; otherwise a hub id missing from the
    cache is downloaded once.
    """
    if model in SHIPPED_MODELS:
        folder, _, trainer = SHIPPED_MODELS[model]
        if not (folder / "config.json").is_file():
            raise ModelNotFoundError(f"the {model} model is not installed at {folder}; build it with {trainer}")
        return folder
    try:
        path = Path(model).expanduser()
    except RuntimeError:  # "~someone" for a user this machine does not know
        raise ModelNotFoundError(f"model folder not found: {model} (no such user's home folder)") from None
    status = path_status(path, "--model folder")
    if status is not None and kind_of(status) == "folder":
        return path
    if status is not None:
        raise ModelNotFoundError(f"model path {model} is a {kind_of(status)}; pass the checkpoint folder")
    if looks_like_url(model):
        raise ModelNotFoundError(f"--model takes demo, a checkpoint folder or a hub id (owner/name, from the local "
                                 f"Hugging Face cache), not a URL: {as_url(model)}")
    if not _looks_like_hub_id(model):
        raise ModelNotFoundError(f"model folder not found: {model}")
    return _from_hub_cache(model)


def _looks_like_hub_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "~", "/"))


def _from_hub_cache(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    how_to = (
        f"download it on a connected machine with `hf download {repo_id}` (it lands in the Hugging Face cache), "
        "or pass --model FOLDER, or --model demo for the built-in demo model"
    )
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        if offline:
            raise ModelNotFoundError(f"model {repo_id} is not in the local Hugging Face cache (offline); {how_to}") from None
    try:
        return Path(snapshot_download(repo_id))
    except Exception as exc:
        raise ModelNotFoundError(f"model {repo_id} could not be downloaded ({type(exc).__name__}); {how_to}") from None


def pick_device_and_dtype(device: str | None = None, dtype: str | None = None) -> tuple[torch.device, torch.dtype]:
    """cuda with bf16 when available, else CPU with float32; either can be overridden."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device_obj = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r} (use cpu, cuda or cuda:N)") from None
    if device_obj.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but no CUDA device is available")
    if dtype is None:
        return device_obj, torch.bfloat16 if device_obj.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r} (use one of {', '.join(DTYPES)})")
    return device_obj, DTYPES[dtype]




# --------------------------------------------------------------------------- families


def families() -> dict[str, type]:
    """config.json model_type -> the family class that serves it: every folder of
    `hae_cli/model/` whose package names its class (or classes) as `FAMILY` (adding a family is
    adding a folder)."""
    import importlib
    import pkgutil

    import hae_cli.model as package

    found: dict[str, type] = {}
    for module in pkgutil.iter_modules(package.__path__):
        if not module.ispkg:
            continue
        family = getattr(importlib.import_module(f"{package.__name__}.{module.name}"), "FAMILY", ())
        for cls in family if isinstance(family, tuple) else (family,):
            for model_type in cls.model_types:
                found[model_type] = cls
    return found


def read_config(folder: Path) -> dict:
    """A checkpoint's `config.json`, as a dict."""
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"no config.json in {folder}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"config.json in {folder} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"config.json in {folder} is not a JSON object")
    return raw


def family_of(folder: Path):
    """The family class that serves the checkpoint in `folder`, by `config.json`'s model_type."""
    model_type = read_config(folder).get("model_type")
    known = families()
    if model_type not in known:
        raise CheckpointError(
            f"{folder}: model_type {model_type!r} is not supported (expected one of {', '.join(sorted(known))})"
        )
    return known[model_type]


def load_model(model: str, device: str | None = None, dtype: str | None = None, *,
               options: dict[str, int] | None = None, on_progress=None):
    """Load "demo", a checkpoint folder, or a hub id from the local HF cache, through its family
    (`options`: the family's image options)."""
    import time

    from hae_cli.cache.attention import register_attention

    progress = on_progress or (lambda message: None)
    start = time.perf_counter()
    progress(f"resolving model {model}")
    folder = resolve_model_path(model)
    device_obj, dtype_obj = pick_device_and_dtype(device, dtype)
    family = family_of(folder)
    register_attention()
    loaded = family.load(folder, device_obj, dtype_obj, name=model, options=options, on_progress=progress)
    loaded.load_seconds = time.perf_counter() - start
    return loaded
