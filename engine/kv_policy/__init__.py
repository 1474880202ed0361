"""KV-cache policies: which rows of a request's KV cache stay resident (eviction and merging), chosen by name.

``none`` keeps everything (the exact baseline). The others bound each request's resident KV to ``kv_budget`` rows,
so long contexts and many sequences fit a fixed KV memory at some loss of quality; docs/kv-policies.md measures it.
They rewrite a request's blocks in place, so prefix caching is off with them.

``quest`` evicts nothing: every row stays resident, and each decode token reads only ``kv_budget`` rows' worth of
blocks, chosen against its query (kernels/page_selection.py), so it saves memory bandwidth and decode time, not
memory. Prefix caching stays on with it.
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
from kernels.page_selection import PageSelectionPolicy

EVICTION_POLICIES: dict[str, type[EvictionPolicy]] = {
    cls.name: cls for cls in (SinkWindowPolicy, KeyNormPolicy, SnapKVPolicy, EvictMergePolicy)
}
PAGE_SELECTION_POLICY = "quest"
KV_POLICY_NAMES = ("none", *EVICTION_POLICIES, PAGE_SELECTION_POLICY)

__all__ = [
    "EVICTION_POLICIES",
    "KV_POLICY_NAMES",
    "EvictionPolicy",
    "KVCompactor",
    "PageSelectionPolicy",
    "QueryRecorder",
    "build_eviction_policy",
    "build_page_selection",
]


def build_eviction_policy(
    name: str, budget: int, sink_tokens: int, window_tokens: int, block_size: int
) -> EvictionPolicy | None:
    """The named policy, or None for ``none``; ValueError for an unknown name or bad parameters."""
    if name in ("none", PAGE_SELECTION_POLICY):
        return None
    if name not in EVICTION_POLICIES:
        raise ValueError(f"unknown kv_policy {name!r} (known: {', '.join(KV_POLICY_NAMES)})")
    # Compact once a block's worth of rows has accumulated: the freed rows then always free a block.
    return EVICTION_POLICIES[name](budget, sink_tokens, window_tokens, slack=block_size)


def build_page_selection(
    name: str, budget: int, sink_tokens: int, window_tokens: int, block_size: int
) -> PageSelectionPolicy | None:
    """Page selection for ``quest``, else None; ValueError for a budget too small for its protected blocks."""
    if name != PAGE_SELECTION_POLICY:
        return None
    return PageSelectionPolicy.from_tokens(budget, sink_tokens, window_tokens, block_size)
