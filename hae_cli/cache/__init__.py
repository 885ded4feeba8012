"""The KV cache: an evicting transformers `Cache`, its attention hook, and the policies.

The cache knows nothing of any model: a model reaches it through transformers' `Cache`
protocol and the "hae_sdpa" attention function (`register_attention`), and tells it what
each forward carries (`begin_tokens`, `end_step`, `after_layer`).
"""

from hae_cli.cache.attention import ATTENTION_NAME, register_attention
from hae_cli.cache.cache import EvictingCache
from hae_cli.cache.layer import EvictingLayer
from hae_cli.cache.modality import Modality
from hae_cli.cache.policies import POLICIES, Policy, make_policy, policy_parameters, register_policy
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
    "register_attention",
    "register_policy",
]
