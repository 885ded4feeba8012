"""The KV cache: an evicting transformers `Cache`, its attention hook, and the policies.

Importing this package registers the "hae_sdpa" attention function with transformers.
"""

from hae_cli.cache import attention  # noqa: F401  (registers "hae_sdpa")
from hae_cli.cache.attention import ATTENTION_NAME
from hae_cli.cache.cache import EvictingCache
from hae_cli.cache.layer import EvictingLayer
from hae_cli.cache.modality import Modality
from hae_cli.cache.policies import POLICIES, Policy, make_policy, policy_parameters
from hae_cli.cache.recycle_bin import RecycleBin

__all__ = [
    "ATTENTION_NAME",
    "POLICIES",
    "EvictingCache",
    "EvictingLayer",
    "Modality",
    "Policy",
    "RecycleBin",
    "make_policy",
    "policy_parameters",
]
