"""KV-cache policies: which rows of a request's KV cache stay resident (eviction and merging), chosen by name.

``none`` keeps everything (the exact baseline). The others bound each request's resident KV to ``kv_budget`` rows,
so long contexts and many sequences fit a fixed KV memory at some loss of quality; the README's table measures it.
They rewrite a request's blocks in place, so prefix caching is off with them.
"""

from __future__ import annotations

from engine.kv_policy.compactor import KVCompactor
from engine.kv_policy.eviction import (
    EvictionPolicy,
    EvictMergePolicy,
    KeyNormPolicy,
    SinkWindowPolicy,
    SnapKVPolicy,
)
from engine.kv_policy.query_recorder import QueryRecorder

EVICTION_POLICIES: dict[str, type[EvictionPolicy]] = {
    cls.name: cls for cls in (SinkWindowPolicy, KeyNormPolicy, SnapKVPolicy, EvictMergePolicy)
}
KV_POLICY_NAMES = ("none", *EVICTION_POLICIES)

__all__ = [
    "EVICTION_POLICIES",
    "KV_POLICY_NAMES",
    "EvictionPolicy",
    "KVCompactor",
    "QueryRecorder",
    "build_eviction_policy",
]


def build_eviction_policy(
    name: str, budget: int, sink_tokens: int, window_tokens: int, block_size: int
) -> EvictionPolicy | None:
    """The named policy, or None for ``none``; ValueError for an unknown name or bad parameters."""
    if name == "none":
        return None
    if name not in EVICTION_POLICIES:
        raise ValueError(f"unknown kv_policy {name!r} (known: {', '.join(KV_POLICY_NAMES)})")
    # Compact once a block's worth of rows has accumulated: the freed rows then always free a block.
    return EVICTION_POLICIES[name](budget, sink_tokens, window_tokens, slack=block_size)
