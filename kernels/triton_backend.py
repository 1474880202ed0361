"""The attention backend for CUDA devices: every step's K/V write and attention run in Spindle's Triton kernels.

Under KIVI's block codec the step's new rows are staged and sealed in PyTorch (kernels/codec_cache.py: a block is
encoded once, when it fills) and the kernels read sealed blocks and residual rows in place.

On a machine without a GPU the same backend runs under Triton's interpreter (``TRITON_INTERPRET=1``), which is how
its kernels are checked against PyTorch references on the CPU; see ``kernels/triton_ops``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from kernels.backend import BatchLayout, pad_block_tables
from kernels.codec_cache import CodecCache, CodecStep, codec_step
from kernels.quantized_cache import QuantizedCache


@dataclass(frozen=True)
class TritonDecodeBatch:
    block_tables: torch.Tensor  # int32 [decodes, max blocks]
    context_lens: torch.Tensor  # int32 [decodes]
    max_context_len: int
    residual_buffers: torch.Tensor | None  # int32 [decodes], under a block codec


@dataclass(frozen=True)
class TritonPrefillBatch:
    block_tables: torch.Tensor  # int32 [prefills, max blocks]
    query_starts: torch.Tensor  # int32 [prefills]: first row of each prefill in the flat batch
    query_lens: torch.Tensor
    context_lens: torch.Tensor
    max_query_len: int
    residual_buffers: torch.Tensor | None  # int32 [prefills], under a block codec


@dataclass(frozen=True)
class TritonAttentionMetadata:
    slot_mapping: torch.Tensor
    num_decodes: int
    decode: TritonDecodeBatch | None
    prefill: TritonPrefillBatch | None
    codec: CodecStep | None  # under a block codec


def _int32(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=device)


class TritonAttentionBackend:
    name = "triton"

    def __init__(self, device: torch.device) -> None:
        # Imported here: Triton kernels are only defined once a backend that uses them is asked for.
        from kernels.triton_ops import kv_write, paged_decode, paged_prefill

        self.device = device
        self._write_kv = kv_write.write_kv
        self._decode = paged_decode.paged_decode_attention
        self._prefill = paged_prefill.paged_prefill_attention

    def prepare(self, layout: BatchLayout, dtype: torch.dtype) -> TritonAttentionMetadata:
        num_decodes = layout.num_decodes
        decode = prefill = codec = None
        residuals: list[int] | None = None
        if layout.residual_buffers is not None:
            # No query energy is tracked here (ThinK goes through a working set), so the decay is never used.
            codec = codec_step(layout, layout.residual_buffers, None, decay=0.0)
            residuals = [written for _, written in layout.residual_buffers]
        if num_decodes:
            lengths = layout.context_lens[:num_decodes]
            tables = pad_block_tables(layout.block_tables[:num_decodes], torch.int32, self.device)
            decode_residuals = None if residuals is None else _int32(residuals[:num_decodes], self.device)
            decode = TritonDecodeBatch(tables, _int32(lengths, self.device), max(lengths), decode_residuals)
        if num_decodes < len(layout.query_lens):
            query_lens = layout.query_lens[num_decodes:]
            starts = [num_decodes]
            for length in query_lens[:-1]:
                starts.append(starts[-1] + length)
            prefill = TritonPrefillBatch(
                pad_block_tables(layout.block_tables[num_decodes:], torch.int32, self.device),
                _int32(starts, self.device),
                _int32(query_lens, self.device),
                _int32(layout.context_lens[num_decodes:], self.device),
                max(query_lens),
                None if residuals is None else _int32(residuals[num_decodes:], self.device),
            )
        return TritonAttentionMetadata(layout.slot_mapping.to(self.device), num_decodes, decode, prefill, codec)

    def with_decode_tables(
        self,
        metadata: TritonAttentionMetadata,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        max_context_len: int,
    ) -> TritonAttentionMetadata:
        """The step with its decodes reading other int32 block tables and lengths (page selection)."""
        return replace(metadata, decode=TritonDecodeBatch(block_tables, context_lens, max_context_len, None))

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_cache: torch.Tensor | QuantizedCache | CodecCache,
        value_cache: torch.Tensor | QuantizedCache | CodecCache,
        metadata: TritonAttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        if isinstance(key_cache, CodecCache):
            assert isinstance(value_cache, CodecCache) and metadata.codec is not None
            key_cache.write(key, metadata.codec)
            value_cache.write(value, metadata.codec)
        else:
            assert not isinstance(value_cache, CodecCache)
            self._write_kv(key, value, key_cache, value_cache, metadata.slot_mapping)
        output = torch.empty_like(query)
        if metadata.decode is not None:
            batch = metadata.decode
            output[: metadata.num_decodes] = self._decode(
                query[: metadata.num_decodes],
                key_cache,
                value_cache,
                batch.block_tables,
                batch.context_lens,
                batch.max_context_len,
                scale,
                residual_buffers=batch.residual_buffers,
            )
        if metadata.prefill is not None:
            batch = metadata.prefill
            self._prefill(
                query,
                key_cache,
                value_cache,
                output,
                batch.block_tables,
                batch.query_starts,
                batch.query_lens,
                batch.context_lens,
                batch.max_query_len,
                scale,
                batch.residual_buffers,
            )
        return output
