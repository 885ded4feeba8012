"""Full cache: the reference every other policy is measured against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from hae_cli.cache.policies.base import Policy


@dataclass
class FullPolicy(Policy):
    """No eviction: every token stays in every layer. Outputs match transformers' DynamicCache
    token for token; the cache still reports what it holds."""

    name: ClassVar[str] = "full"
