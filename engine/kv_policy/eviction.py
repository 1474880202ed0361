"""Eviction policies: which KV rows of a request stay resident once it holds more than its budget.

A policy sees one layer of one request at a time: its resident keys and values ``[N, kv_heads, head_dim]`` (keys
already rotated, so a row keeps its position whatever slot it moves to) and, for policies that score rows by
attention, the most recent queries. It returns ``budget`` rows per KV head. Every policy always keeps the first
``sink_tokens`` rows (attention sinks) and the last ``window_tokens`` rows (the local context the next tokens need
most); the methods differ in how they fill the rest of the budget.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch


class EvictionPolicy(ABC):
    """Keeps ``budget`` KV rows per request, layer and KV head; compaction is triggered once a request holds
    ``budget + slack`` rows, so that its cost is paid once every ``slack`` decode steps rather than every step."""

    name: ClassVar[str]
    uses_queries: ClassVar[bool] = False

    def __init__(self, budget: int, sink_tokens: int, window_tokens: int, slack: int) -> None:
        if sink_tokens < 0 or window_tokens < 1:
            raise ValueError(
                f"kv_sink_tokens must be >= 0 and kv_window_tokens >= 1, got {sink_tokens} and {window_tokens}"
            )
        if budget < sink_tokens + window_tokens:
            raise ValueError(
                f"kv_budget ({budget}) must be at least kv_sink_tokens + kv_window_tokens "
                f"({sink_tokens} + {window_tokens})"
            )
        self.budget, self.sink_tokens, self.window_tokens, self.slack = budget, sink_tokens, window_tokens, slack

    def should_compact(self, num_kv_tokens: int) -> bool:
        return num_kv_tokens >= self.budget + self.slack

    def compact(
        self, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor | None, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """keys/values [N, KVH, D] -> the kept rows [budget, KVH, D], in their original order."""
        keep = self.select(self.scores(keys, values, queries, scale))
        return gather_rows(keys, keep), gather_rows(values, keep)

    @abstractmethod
    def scores(
        self, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor | None, scale: float
    ) -> torch.Tensor:
        """[KVH, N] importance of each row per KV head (higher is kept first)."""

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """[KVH, budget] indices of the kept rows, ascending: the protected rows plus the best-scored others."""
        num_rows = scores.shape[1]
        scores = scores.float().clone()
        scores[:, : self.sink_tokens] = float("inf")
        scores[:, num_rows - self.window_tokens :] = float("inf")
        return scores.topk(self.budget, dim=1).indices.sort(dim=1).values


def gather_rows(rows: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """rows [N, KVH, D], keep [KVH, K] -> [K, KVH, D] with row keep[h, i] of head h at [i, h]."""
    index = keep.t().unsqueeze(-1).expand(-1, -1, rows.shape[-1])
    return rows.gather(0, index)


class SinkWindowPolicy(EvictionPolicy):
    """StreamingLLM (Xiao et al., 2023, "Efficient Streaming Language Models with Attention Sinks") and LM-Infinite
    (Han et al., 2023): keep the first tokens, whose attention mass anchors the softmax, and a recent window; the
    budget beyond the sinks is all window. Generation continues indefinitely in constant memory."""

    name = "sink_window"

    def __init__(self, budget: int, sink_tokens: int, window_tokens: int, slack: int) -> None:
        super().__init__(budget, sink_tokens, budget - sink_tokens, slack)

    def scores(
        self, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor | None, scale: float
    ) -> torch.Tensor:
        return torch.zeros(keys.shape[1], keys.shape[0])  # only the protected rows matter; they fill the budget


class KeyNormPolicy(EvictionPolicy):
    """Devoto et al., 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression": keys with a low
    L2 norm draw high attention, so keep the rows with the smallest key norms. Needs no attention scores, so it works
    with any attention kernel."""

    name = "key_norm"

    def scores(
        self, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor | None, scale: float
    ) -> torch.Tensor:
        return -keys.float().norm(dim=-1).t()


class SnapKVPolicy(EvictionPolicy):
    """SnapKV (Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before Generation"), with H2O's heavy
    hitters (Zhang et al., 2023) in mind: the attention mass the most recent queries (the observation window) put on
    each row, summed over the window and the query heads of the KV head's group, smoothed by a max-pool so that
    neighbours of a heavy hitter are kept with it. Re-run during decode, the window is the latest decode queries."""

    name = "snapkv"
    uses_queries = True
    pool_kernel = 7

    def scores(
        self, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor | None, scale: float
    ) -> torch.Tensor:
        mass = attention_mass(keys, queries, scale)
        pooled = torch.nn.functional.max_pool1d(mass.unsqueeze(1), self.pool_kernel, 1, self.pool_kernel // 2)
        return pooled.squeeze(1)


def attention_mass(keys: torch.Tensor, queries: torch.Tensor | None, scale: float) -> torch.Tensor:
    """[KVH, N]: softmax attention of queries [W, H, D] (the request's last W tokens, whose rows are the last W of
    ``keys``) over keys [N, KVH, D], causally masked, summed over queries and each KV head's query group."""
    if queries is None:
        raise ValueError("this policy scores rows by attention and needs the recent queries")
    num_rows, kv_heads, _ = keys.shape
    window = min(queries.shape[0], num_rows)
    queries = queries[-window:].float()
    group = queries.shape[1] // kv_heads
    q = queries.view(window, kv_heads, group, -1).permute(1, 2, 0, 3).reshape(kv_heads, group * window, -1)
    logits = q @ keys.float().permute(1, 2, 0) * scale  # [KVH, G*W, N]
    query_rows = torch.arange(num_rows - window, num_rows).repeat(group)
    future = torch.arange(num_rows).unsqueeze(0) > query_rows.unsqueeze(1)
    logits.masked_fill_(future, float("-inf"))
    return logits.softmax(dim=-1).sum(dim=1)


class EvictMergePolicy(SnapKVPolicy):
    """Evict-then-merge in the manner of EMS (Li et al., 2024, "EMS: Adaptive Evict-then-Merge Strategy for
    Head-wise KV Cache Compression") and CaM (Zhang et al., 2024): rows are chosen as SnapKV does, but each evicted row
    is merged into the kept row whose key is most similar (cosine), keys and values averaged with the rows' attention
    mass as weights, so the evicted information is compressed rather than dropped. Protected rows (sinks, window)
    are never changed."""

    name = "evict_merge"

    def compact(
        self, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor | None, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mass = attention_mass(keys, queries, scale)  # [KVH, N]
        keep = self.select(self.scores(keys, values, queries, scale))  # [KVH, K]
        kv_heads, num_rows = mass.shape
        kept_k, kept_v = gather_rows(keys, keep).float(), gather_rows(values, keep).float()  # [K, KVH, D]
        evicted = torch.ones(kv_heads, num_rows, dtype=torch.bool)
        evicted.scatter_(1, keep, False)
        weight_kept = mass.gather(1, keep).t().unsqueeze(-1)  # [K, KVH, 1]
        sum_k, sum_v, sum_w = kept_k * weight_kept, kept_v * weight_kept, weight_kept.clone()
        # Only kept rows outside the sinks and the window absorb evicted ones.
        mergeable = (keep >= self.sink_tokens) & (keep < num_rows - self.window_tokens)  # [KVH, K]
        unit_kept = torch.nn.functional.normalize(kept_k, dim=-1).permute(1, 0, 2)  # [KVH, K, D]
        unit_all = torch.nn.functional.normalize(keys.float(), dim=-1).permute(1, 0, 2)  # [KVH, N, D]
        similarity = unit_all @ unit_kept.transpose(1, 2)  # [KVH, N, K]
        similarity.masked_fill_(~mergeable.unsqueeze(1), float("-inf"))
        target = similarity.argmax(dim=-1)  # [KVH, N]
        for head in range(kv_heads):
            rows = evicted[head].nonzero().squeeze(1)
            if rows.numel() == 0 or not mergeable[head].any():
                continue
            into, w = target[head, rows], mass[head, rows].unsqueeze(-1)
            sum_k[:, head].index_add_(0, into, keys[rows, head].float() * w)
            sum_v[:, head].index_add_(0, into, values[rows, head].float() * w)
            sum_w[:, head].index_add_(0, into, w)
        sum_w = sum_w.clamp_min(torch.finfo(torch.float32).tiny)
        return (sum_k / sum_w).to(keys.dtype), (sum_v / sum_w).to(values.dtype)
