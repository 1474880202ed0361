"""Paged attention on the CPU.

Decode sequences (one query token each), and the first sequences of the batch with a few query tokens (up to
DECODE_STYLE_MAX_QUERY_LEN: verifying speculative drafts), go through one decode path, a few-token sequence as one
decode row per query token whose context ends at that token (its K/V is written before attention, so each row sees
exactly its causal prefix). Measured on a 400-token context, five such rows cost about as much as the prefill path
with one thread and half as much with two, where the prefill path's gather and fused attention synchronise the
threads many more times. The decode path is one of two:
- the native kernel (kernels/native.py, kernels/csrc), which reads K/V in place through the block tables, once for
  all the rows of a sequence; or
- vectorised PyTorch, used where the native kernel can't be built: decodes are handled in groups of
  DECODE_GROUP_SIZE sequences whose blocks are gathered through padded block tables, with the query heads of each KV
  head treated as a small matrix (grouped-query attention without repeating K/V). Grouping keeps the gathered K/V of
  a group in the CPU caches: one gather over a batch of 128 sequences was measured 3x slower per sequence than groups
  of 16.
Prefill chunks attend to their cached prefix plus themselves under a causal mask (PyTorch's fused CPU attention),
one sequence at a time. Prompts without a cached prefix go to the native prompt kernel in bf16 where it is built
(AVX512-BF16: all of them in one call, about 4x the fused attention on sixteen 128-token prompts), else in one
batched fused call per padded length: one by one, sixteen such prompts took 160 of a 720 ms prefill step.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from kernels.backend import BatchLayout, pad_block_tables
from kernels.native import DecodeBatch, NativeKernels
from kernels.shape_buckets import BUCKETED_DTYPES, bucket_rows, bucket_sizes


@dataclass(frozen=True)
class PrefillChunk:
    query_start: int
    query_len: int
    context_len: int
    block_ids: torch.Tensor  # the blocks that hold the context, in order


@dataclass(frozen=True)
class FreshPrompts:
    """Prefill chunks without a cached prefix whose rows pad to the same length: attended to in one call."""

    rows: list[tuple[int, int]]  # (first query row, rows) of each
    padded_len: int


DECODE_GROUP_SIZE = 16
MASKED_KEY_MULTIPLE = 128
DECODE_STYLE_MAX_QUERY_LEN = 16


@dataclass(frozen=True)
class DecodeGroup:
    start: int  # first row of the group in the batch
    block_tables: torch.Tensor  # [group size, max blocks in the group]
    bias: torch.Tensor  # [group size, 1, 1, max blocks * block_size]: 0 for real tokens, -inf for padding


@dataclass(frozen=True)
class CpuAttentionMetadata:
    slot_mapping: torch.Tensor
    num_decodes: int  # decode rows: the leading query tokens, one per row
    decode: DecodeBatch | list[DecodeGroup]
    prefills: list[PrefillChunk]  # chunks after a cached prefix
    fresh_prompts: list[FreshPrompts]
    fresh_rows: torch.Tensor  # int32 [fresh prompts, 2]: every fresh prompt's (first row, rows), for the native kernel


def write_kv(
    key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, slots: torch.Tensor
) -> None:
    """Scatter new K/V rows [T, KVH, D] into the caches at flat slot indices (block * block_size + offset)."""
    key_cache.view(-1, *key_cache.shape[2:]).index_copy_(0, slots, key)
    value_cache.view(-1, *value_cache.shape[2:]).index_copy_(0, slots, value)


def decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence. query [B, H, D] -> [B, H, D]."""
    batch, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    blocks = block_tables.flatten()

    def gather(cache: torch.Tensor) -> torch.Tensor:
        # index_select is several times faster than advanced indexing here; the one copy into [B, KVH, L, D]
        # gives the matmuls contiguous operands.
        rows = cache.index_select(0, blocks).view(batch, -1, num_kv_heads, head_dim)
        return rows.transpose(1, 2).contiguous()

    keys, values = gather(key_cache), gather(value_cache)
    grouped_query = query.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = torch.matmul(grouped_query, keys.transpose(-1, -2)).float() * scale + bias
    probs = torch.softmax(scores, dim=-1).to(query.dtype)
    return torch.matmul(probs, values).view(batch, num_heads, head_dim)


def prefill_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, query_offset: int, scale: float
) -> torch.Tensor:
    """Causal attention of query rows [Lq, H, D] at positions query_offset.. over key/value [Lk, KVH, D].

    In bf16/fp16 the rows and keys are padded (kernels/shape_buckets.py): PyTorch's fused attention keeps compiled
    micro-kernels per shape, and unpadded lengths grew resident memory by about 2.7 MiB per new pair of lengths.
    Queries are padded to a row bucket; keys to the same bucket without a cached prefix, else to a multiple of
    MASKED_KEY_MULTIPLE (which leaves a few remainders modulo the kernel's key blocks). Padding comes after every real
    row and key, so causality hides the padded keys from the real rows, and the padded rows are dropped."""
    rows, keys = query.shape[0], key.shape[0]
    bucketed = query.dtype in BUCKETED_DTYPES
    padded_rows = padded_prompt_len(rows, query.dtype)
    if query_offset == 0:
        return fresh_prompt_attention(query, key, value, FreshPrompts([(0, rows)], padded_rows), scale)[0][:rows]
    q = _padded_heads_first(query, padded_rows)
    padded_keys = -(-keys // MASKED_KEY_MULTIPLE) * MASKED_KEY_MULTIPLE if bucketed else keys
    k, v = _padded_heads_first(key, padded_keys), _padded_heads_first(value, padded_keys)
    query_positions = torch.arange(query_offset, query_offset + q.shape[2]).unsqueeze(1)
    visible = torch.arange(padded_keys).unsqueeze(0) <= query_positions
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale, enable_gqa=True)
    return out.squeeze(0).transpose(0, 1)[:rows]


def padded_prompt_len(rows: int, dtype: torch.dtype) -> int:
    return bucket_rows(rows) if dtype in BUCKETED_DTYPES else rows


def fresh_prompt_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, prompts: FreshPrompts, scale: float
) -> torch.Tensor:
    """Causal attention of prompts without a cached prefix, rows [start, start + length) of query [T, H, D] and
    key/value [T, KVH, D] each, in one call: [prompts, padded_len, H, D], each prompt's padding rows after its own
    (which causality hides from its real rows)."""

    def batched(rows: torch.Tensor) -> torch.Tensor:
        if len(prompts.rows) == 1 and prompts.rows[0][1] == prompts.padded_len:
            start, length = prompts.rows[0]
            return rows[start : start + length].unsqueeze(0).transpose(1, 2)
        out = rows.new_zeros(len(prompts.rows), prompts.padded_len, *rows.shape[1:])
        for index, (start, length) in enumerate(prompts.rows):
            out[index, :length] = rows[start : start + length]
        return out.transpose(1, 2)

    out = F.scaled_dot_product_attention(
        batched(query), batched(key), batched(value), is_causal=True, scale=scale, enable_gqa=True
    )
    return out.transpose(1, 2)


def _padded_heads_first(rows: torch.Tensor, length: int) -> torch.Tensor:
    """[L, heads, D] -> [1, heads, length, D], zero rows appended (a view when there are none to append)."""
    if length > rows.shape[0]:
        rows = F.pad(rows, (0, 0, 0, 0, 0, length - rows.shape[0]))
    return rows.transpose(0, 1).unsqueeze(0)


def warm_up_prefill_attention(
    num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, max_query_len: int
) -> None:
    """Compile now the fused-attention kernels of every padded shape, so that resident memory stops growing after
    start-up (measured: 400 random prompt/prefix lengths afterwards added 4 MiB) and no prompt waits for a
    compilation: each query bucket up to ``max_query_len``, alone and after cached prefixes whose padded lengths
    cover every remainder of the kernel's 512-key blocks. About 3 s and 100 MiB; nothing to do outside bf16/fp16."""
    if dtype not in BUCKETED_DTYPES:
        return
    for rows in bucket_sizes(max_query_len):
        query = torch.zeros(rows, num_heads, head_dim, dtype=dtype)
        key = torch.zeros(rows + 1024, num_kv_heads, head_dim, dtype=dtype)
        prefill_attention(query, key[:rows], key[:rows], 0, 1.0)
        for prefix in range(1, 1025, MASKED_KEY_MULTIPLE):
            prefill_attention(query, key[: rows + prefix], key[: rows + prefix], prefix, 1.0)


def _decode_group(start: int, tables: list[list[int]], context_lens: list[int], block_size: int) -> DecodeGroup:
    padded = pad_block_tables(tables, torch.long)
    max_blocks = padded.shape[1]
    positions = torch.arange(max_blocks * block_size)
    lengths = torch.tensor(context_lens, dtype=torch.long).unsqueeze(1)
    bias = torch.zeros((len(tables), max_blocks * block_size), dtype=torch.float32)
    bias.masked_fill_(positions.unsqueeze(0) >= lengths, float("-inf"))
    return DecodeGroup(start, padded, bias[:, None, None, :])


def decode_sequences(layout: BatchLayout) -> int:
    """How many leading sequences have at most DECODE_STYLE_MAX_QUERY_LEN query tokens (the decode path's)."""
    count = 0
    for query_len in layout.query_lens:
        if query_len > DECODE_STYLE_MAX_QUERY_LEN:
            break
        count += 1
    return count


def decode_rows(layout: BatchLayout, num_sequences: int) -> tuple[list[list[int]], list[int]]:
    """The decode sequences' rows: each row's block table and context length (query token ``j`` of ``n`` sees the
    context up to itself)."""
    tables: list[list[int]] = []
    lengths: list[int] = []
    for query_len, context_len, table in zip(
        layout.query_lens[:num_sequences], layout.context_lens[:num_sequences], layout.block_tables
    ):
        tables.extend([table] * query_len)
        lengths.extend(range(context_len - query_len + 1, context_len + 1))
    return tables, lengths


class CpuAttentionBackend:
    """Paged attention on the CPU; decodes through ``native`` kernels when given, else vectorised PyTorch."""

    def __init__(self, native: NativeKernels | None = None) -> None:
        self.native = native
        self.name = "cpu" if native is not None else "torch"

    def prepare(self, layout: BatchLayout, dtype: torch.dtype) -> CpuAttentionMetadata:
        num_sequences = decode_sequences(layout)
        num_decodes = sum(layout.query_lens[:num_sequences])
        decode: DecodeBatch | list[DecodeGroup] = []
        if self.native is not None and num_decodes:
            decode = DecodeBatch(
                pad_block_tables(layout.block_tables[:num_sequences], torch.int32),
                torch.tensor(layout.context_lens[:num_sequences], dtype=torch.int32),
                torch.tensor(layout.query_lens[:num_sequences], dtype=torch.int32),
            )
        elif self.native is None:
            tables, lengths = decode_rows(layout, num_sequences)
            for start in range(0, num_decodes, DECODE_GROUP_SIZE):
                end = min(start + DECODE_GROUP_SIZE, num_decodes)
                decode.append(_decode_group(start, tables[start:end], lengths[start:end], layout.block_size))
        prefills = []
        fresh: dict[int, list[tuple[int, int]]] = {}  # padded length -> the prompts' rows
        query_start = num_decodes
        for query_len, context_len, table in zip(
            layout.query_lens[num_sequences:], layout.context_lens[num_sequences:], layout.block_tables[num_sequences:]
        ):
            if context_len == query_len:
                fresh.setdefault(padded_prompt_len(query_len, dtype), []).append((query_start, query_len))
            else:
                num_blocks = -(-context_len // layout.block_size)
                block_ids = torch.tensor(table[:num_blocks], dtype=torch.long)
                prefills.append(PrefillChunk(query_start, query_len, context_len, block_ids))
            query_start += query_len
        fresh_prompts = [FreshPrompts(rows, padded_len) for padded_len, rows in fresh.items()]
        # Built once here rather than by each layer's call.
        fresh_rows = torch.tensor([row for group in fresh_prompts for row in group.rows], dtype=torch.int32)
        return CpuAttentionMetadata(
            layout.slot_mapping, num_decodes, decode, prefills, fresh_prompts, fresh_rows.reshape(-1, 2)
        )

    def with_decode_tables(
        self,
        metadata: CpuAttentionMetadata,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        max_context_len: int,
    ) -> CpuAttentionMetadata:
        """The step with its decodes reading other int32 block tables and lengths, one per decode row (page
        selection); native only (the kernel finds the longest context itself)."""
        assert self.native is not None, "page selection needs the native decode kernel"
        rows = torch.ones_like(context_lens)
        return replace(metadata, decode=DecodeBatch(block_tables.contiguous(), context_lens.contiguous(), rows))

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        metadata: CpuAttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        write_kv(key, value, key_cache, value_cache, metadata.slot_mapping)
        if isinstance(metadata.decode, DecodeBatch):
            assert self.native is not None
            decoded = self.native.decode_attention(
                query[: metadata.num_decodes].contiguous(), key_cache, value_cache, metadata.decode, scale
            )
            if not metadata.prefills and not metadata.fresh_prompts:  # a pure decode step: the kernel's output is all
                return decoded
            output = torch.empty_like(query)
            output[: metadata.num_decodes] = decoded
        else:
            output = torch.empty_like(query)
            for group in metadata.decode:
                rows = slice(group.start, group.start + group.block_tables.shape[0])
                output[rows] = decode_attention(
                    query[rows], key_cache, value_cache, group.block_tables, group.bias, scale
                )
        self._attend_fresh_prompts(query, key, value, output, metadata, scale)
        for chunk in metadata.prefills:
            rows = slice(chunk.query_start, chunk.query_start + chunk.query_len)
            chunk_key = key_cache.index_select(0, chunk.block_ids).flatten(0, 1)[: chunk.context_len]
            chunk_value = value_cache.index_select(0, chunk.block_ids).flatten(0, 1)[: chunk.context_len]
            query_offset = chunk.context_len - chunk.query_len
            output[rows] = prefill_attention(query[rows], chunk_key, chunk_value, query_offset, scale)
        return output

    def _attend_fresh_prompts(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        output: torch.Tensor,
        metadata: CpuAttentionMetadata,
        scale: float,
    ) -> None:
        """The native kernel where it is built for bf16 here (all the prompts in one call), else one batched fused
        attention per padded length."""
        if not metadata.fresh_prompts:
            return
        native = self.native
        if native is not None and native.has_prompt_attention and query.dtype == torch.bfloat16:
            native.prompt_attention(query, key, value, output, metadata.fresh_rows, scale)
            return
        for prompts in metadata.fresh_prompts:
            attended = fresh_prompt_attention(query, key, value, prompts, scale)
            for index, (start, length) in enumerate(prompts.rows):
                output[start : start + length] = attended[index, :length]
