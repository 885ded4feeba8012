"""The eviction policies, one file each; a new file here with a `Policy` subclass is picked up.

`POLICIES` maps a policy's `name` to its class; `make_policy(name, **params)` builds one and
turns a bad name or parameter into a one-line `ConfigError`; every caller (the library, the
command line, `hae eval`) builds policies through it. A policy written elsewhere joins with
`@register_policy`, or by naming its module in the environment variable `HAE_POLICY_MODULES`
(comma-separated importable modules, imported on first use).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil

from hae_cli.cache.policies.base import LayerView, Policy, PrefillKeep, Rows, param, parameter_help
from hae_cli.cache.policies.capabilities import (
    FollowsOneLayer, QuestionAttention, SwapsForQuestion, TurnSwap, UsesRecycleBin,
)
from hae_cli.cache.policies.scorer import ScorerPolicy
from hae_cli.errors import ConfigError, HaeError

PLUGIN_VARIABLE = "HAE_POLICY_MODULES"
_ORDER = ["full", "hae", "streaming", "h2o", "snapkv", "fastv", "mustdrop", "random"]  # then new ones, by name


def _discover() -> dict[str, type[Policy]]:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    found = {}
    stack = list(Policy.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls.name and cls.__module__.startswith(__name__):
            found[cls.name] = cls
    return found


def _sorted(found: dict[str, type[Policy]]) -> dict[str, type[Policy]]:
    def rank(name: str) -> tuple[int, str]:
        return (_ORDER.index(name) if name in _ORDER else len(_ORDER), name)

    return {name: found[name] for name in sorted(found, key=rank)}


POLICIES: dict[str, type[Policy]] = _sorted(_discover())


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Make a policy class known by its `name` (a class decorator); a policy file inside this
    package needs no registration."""
    if not (isinstance(cls, type) and issubclass(cls, Policy) and dataclasses.is_dataclass(cls)):
        raise ConfigError(f"{cls!r} is not a policy: a @dataclass subclass of hae_cli.cache.policies.Policy")
    if not cls.name or not cls.name.isidentifier():
        raise ConfigError(f"policy class {cls.__name__} needs a `name` that is an identifier, got {cls.name!r}")
    known = POLICIES.get(cls.name)
    if known is not None and known is not cls and known.__qualname__ != cls.__qualname__:
        raise ConfigError(f"policy name {cls.name!r} is taken by {known.__module__}.{known.__qualname__}")
    POLICIES[cls.name] = cls
    POLICIES.update(_sorted(dict(POLICIES)))
    return cls


def load_plugins(modules: str | None = None) -> None:
    """Import the modules named in `HAE_POLICY_MODULES` (or `modules`) and register every named
    policy they define."""
    names = os.environ.get(PLUGIN_VARIABLE, "") if modules is None else modules
    for module_name in filter(None, (name.strip() for name in names.split(","))):
        try:
            module = importlib.import_module(module_name)
        except Exception as error:  # a user's module: any failure is one line naming it
            raise ConfigError(f"{PLUGIN_VARIABLE}: cannot import {module_name!r} ({type(error).__name__}: {error})") from None
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, Policy) and value.name and value.__module__ == module.__name__:
                register_policy(value)


_plugins_loaded = False


def known_policies() -> dict[str, type[Policy]]:
    """Every policy: this package's, the registered ones, and those `HAE_POLICY_MODULES` names
    (imported on first use, so a library caller gets them as the command line does)."""
    global _plugins_loaded
    if not _plugins_loaded:
        load_plugins()
        _plugins_loaded = True
    return POLICIES


def policy_class(name: str) -> type[Policy]:
    registry = known_policies()
    key = name.strip().lower()
    if key not in registry:
        raise ConfigError(f"unknown policy {name!r} (choose from: {', '.join(registry)})")
    return registry[key]


def policy_parameters(name: str) -> dict[str, object]:
    """A policy's parameters and their defaults."""
    return {f.name: f.default for f in dataclasses.fields(policy_class(name))}


def make_policy(name: str, **params) -> Policy:
    """The policy `name` with `params`: each parameter checked against its declared type, then by
    the policy itself; every mistake one `ConfigError` line naming the policy and parameter."""
    cls = policy_class(name)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [key for key in params if key not in fields]
    if unknown:
        raise ConfigError(f"policy {cls.name} has no parameter {unknown[0]!r} (it takes: {', '.join(fields) or 'no parameters'})")
    for key, value in params.items():
        _check_type(cls.name, key, value, fields[key].type)
    try:
        return cls(**params)
    except HaeError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{cls.name}: {error}") from None


def _check_type(policy: str, name: str, value, annotation) -> None:
    kind = str(annotation if isinstance(annotation, str) else getattr(annotation, "__name__", annotation))
    wants_number = any(t in kind for t in ("int", "float"))
    if isinstance(value, str) and "str" not in kind:
        raise ConfigError(f"{policy} parameter {name} expects {kind}, got {value!r}")
    if isinstance(value, bool) and "bool" not in kind and wants_number:
        raise ConfigError(f"{policy} parameter {name} expects {kind}, got {value!r}")
    if isinstance(value, float) and "float" not in kind and "int" in kind:
        raise ConfigError(f"{policy} parameter {name} expects a whole number, got {value!r}")


__all__ = [
    "POLICIES", "FollowsOneLayer", "LayerView", "Policy", "PrefillKeep", "QuestionAttention", "Rows", "ScorerPolicy",
    "SwapsForQuestion", "TurnSwap", "UsesRecycleBin", "known_policies", "load_plugins", "make_policy", "param", "parameter_help",
    "policy_class", "policy_parameters", "register_policy",
]
