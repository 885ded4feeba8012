"""The eviction policies, one file each; a new file with a `Policy` subclass is picked up here.

`POLICIES` maps a policy's `name` to its class; `make_policy(name, **params)` builds one and
turns a bad name or parameter into a one-line `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil

from hae_cli.cache.policies.base import Policy, PrefillKeep, Rows
from hae_cli.errors import ConfigError


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
    order = ["full", "hae", "streaming", "h2o", "snapkv", "fastv", "mustdrop"]  # then new ones, by name

    def rank(name: str) -> tuple[int, str]:
        return (order.index(name) if name in order else len(order), name)

    return {name: found[name] for name in sorted(found, key=rank)}


POLICIES: dict[str, type[Policy]] = _discover()


def policy_parameters(name: str) -> dict[str, object]:
    """A policy's parameters and their defaults."""
    return {f.name: f.default for f in dataclasses.fields(_policy_class(name))}


def make_policy(name: str, **params) -> Policy:
    cls = _policy_class(name)
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ConfigError(
            f"policy {name!r} has no parameter {unknown[0]!r}; it takes: {', '.join(sorted(allowed)) or 'none'}"
        )
    return cls(**params)


def _policy_class(name: str) -> type[Policy]:
    if name not in POLICIES:
        raise ConfigError(f"policy must be one of {', '.join(POLICIES)}, got {name!r}")
    return POLICIES[name]


__all__ = ["POLICIES", "Policy", "PrefillKeep", "Rows", "make_policy", "policy_parameters"]
