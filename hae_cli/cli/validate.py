"""Options checked at the edge, before the model loads: budgets, policy names and parameters,
sampling, images. Each mistake is a `ConfigError` or `InputError` naming the option."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hae_cli.errors import ConfigError, InputError
from hae_cli.checks import parse_budget, parse_param_value


def collect_policy_args(
    budget: str | None, visual_keep: float | None, score_layer: int | None, params: Sequence[str] | None
) -> dict[str, Any]:
    """The policy parameters of `--budget`, `--visual-keep`, `--score-layer` and each `-p`. One
    parameter given twice (`--budget 0.5 -p budget=0.3`, or two `-p budget=`) is refused: which
    one wins would be a guess."""
    args: dict[str, Any] = {}
    given: dict[str, str] = {}

    def add(name: str, value: Any, written: str) -> None:
        if name in given:
            raise ConfigError(f"{name} is given twice ({given[name]} and {written}); give it once")
        given[name], args[name] = written, value

    for item in params or ():
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise ConfigError(f"--param expects NAME=VALUE, got {item!r}")
        add(name, parse_param_value(name, value, f"-p {name}"), f"-p {item.strip()}")
    if budget is not None:
        add("budget", parse_budget(budget), f"--budget {budget}")
    if visual_keep is not None:
        if not (math.isfinite(visual_keep) and 0 < visual_keep <= 1):
            raise ConfigError(f"--visual-keep must be a fraction in (0, 1] (e.g. 0.4), got {visual_keep}")
        add("visual_keep", visual_keep, f"--visual-keep {visual_keep:g}")
    if score_layer is not None:
        add("score_layer", score_layer, f"--score-layer {score_layer}")
    return args


def check_policy_name(name: str) -> str:
    from hae_cli.cache.policies import policy_class

    return policy_class(name).name


def policy_fields(policy: str) -> dict[str, Any]:
    import dataclasses

    from hae_cli.cache.policies import policy_class

    return {f.name: f for f in dataclasses.fields(policy_class(policy))}


def checked_policy(policy: str, args: dict[str, Any], strict: bool = True):
    """The policy built from `args` by the library's `make_policy` (its checks are the same for
    every caller), once, and handed to the library as it is.

    `strict`: a parameter the policy does not take is an error (ask, story, chat); otherwise it
    is skipped (profile applies one budget to every policy that has one)."""
    from hae_cli.cache.policies import make_policy

    if not strict:
        fields = policy_fields(policy)
        args = {name: value for name, value in args.items() if name in fields}
    return make_policy(policy, **args)


def check_images(images: Sequence[Path]) -> list[Path]:
    """Decode every image before the model loads, so a bad file fails in a second, not after a minute."""
    from hae_cli.model.image_file import load_image

    for path in images:
        load_image(path)
    return list(images)


SAMPLING_OPTIONS = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_p": "--top-p",
                    "seed": "--seed"}


def check_sampling(options) -> None:
    """The generation loop's own checks (max_new_tokens, temperature, top_p), before the model
    loads; a mistake names the option as the user typed it (--top-p, not top_p)."""
    from hae_cli.model.sampling import SamplingConfig

    try:
        SamplingConfig(options.max_new_tokens, options.temperature, options.top_p, options.seed)
    except ConfigError as error:
        field, _, rest = str(error).partition(" ")
        raise ConfigError(f"{SAMPLING_OPTIONS.get(field, field)} {rest}") from None


def check_kept_options(kept, max_new_tokens: int) -> None:
    """What can be checked before the model loads: --kept-* need --show-kept, a writable PNG path,
    and a step the run can reach (the last token is not fed back, so -n N ends at step N - 1)."""
    if kept.path is None:
        for name, value in (("--kept-layer", kept.layer), ("--kept-step", kept.step)):
            if value is not None:
                raise InputError(f"{name} chooses what --show-kept draws; add --show-kept FILE.png")
        return
    check_writable(kept.path)
    if kept.step is not None and kept.step > max_new_tokens - 1:
        raise InputError(f"--kept-step {kept.step} is beyond the run: with --max-new-tokens {max_new_tokens} "
                         f"the last decode step is {max_new_tokens - 1} (0 = after prefill)")


def kept_layer_for(kept, num_layers: int) -> int:
    """The layer --show-kept draws, checked once the model's config says how many there are."""
    if kept.layer is not None and kept.layer >= num_layers:
        raise InputError(f"--kept-layer {kept.layer} is out of range: the model has {num_layers} layers "
                         f"(0 to {num_layers - 1})")
    return num_layers - 1 if kept.layer is None else kept.layer


def check_writable(path: Path, option: str = "--show-kept") -> None:
    """Fail before the run, not after it, when the picture could not be written."""
    from hae_cli.checks import check_output_path

    check_output_path(path, option, ".png")
