"""The physical paged KV store: per layer, K and V of [num_blocks, block_size, kv_heads, head_dim], stored in the
model's dtype, quantized to 8 or 4 bits per token (``kv_cache_dtype``, kernels/quantized_cache.py), or compressed a
full block at a time by block codecs (``kv_codec``, ``kv_key_channel_keep``: kernels/codec_cache.py), with each
running sequence's filling block in full precision in a reserve of residual buffers."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.errors import ConfigError
from engine.model_spec import ModelSpec
from kernels.codec_cache import CodecCache
from kernels.kv_codecs import BlockCodec, CodecSettings
from kernels.quantized_cache import PagedCache, QuantizedCache

KV_CACHE_BITS = {"int8": 8, "int4": 4}  # kv_cache_dtype names beside "auto" (the model's dtype)

KVCache = PagedCache | CodecCache


@dataclass(frozen=True)
class KVCacheLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype
    kv_cache_dtype: str = "auto"
    codecs: CodecSettings = field(default_factory=CodecSettings)

    @classmethod
    def for_model(
        cls,
        spec: ModelSpec,
        block_size: int,
        dtype: torch.dtype,
        kv_cache_dtype: str = "auto",
        codecs: CodecSettings | None = None,
    ) -> KVCacheLayout:
        codecs = codecs or CodecSettings()
        return cls(spec.num_layers, spec.num_kv_heads, spec.head_dim, block_size, dtype, kv_cache_dtype, codecs)

    @property
    def bits(self) -> int | None:
        """Per-token quantization bits of a QuantizedCache, or None (the model's dtype, or block codecs)."""
        return None if self.codecs.active else KV_CACHE_BITS.get(self.kv_cache_dtype)

    def block_codecs(self) -> tuple[BlockCodec, BlockCodec] | None:
        """The key and value codecs, or None without block compression; ConfigError for settings the model's
        shape cannot take."""
        if not self.codecs.active:
            return None
        try:
            return self.codecs.build(self.block_size, self.num_kv_heads, self.head_dim, self.dtype)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc

    @property
    def bytes_per_block(self) -> int:
        """What one block takes in every layer, K and V: exactly what the block pool accounts for."""
        codecs = self.block_codecs()
        if codecs is not None:
            return self.num_layers * sum(codec.bytes_per_block for codec in codecs)
        # Levels, then an fp32 scale and zero point; or the model's dtype.
        per_head = self.head_dim * self.dtype.itemsize if self.bits is None else self.head_dim * self.bits // 8 + 8
        return 2 * self.num_layers * self.num_kv_heads * per_head * self.block_size

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_per_block / self.block_size

    def residual_bytes(self, num_slots: int) -> int:
        """The reserve beside the blocks under block codecs: two full-precision buffers per slot (one running
        sequence), K and V, every layer; plus ThinK's query energy (fp32, per slot, KV head and channel)."""
        if not self.codecs.active:
            return 0
        rows = 2 * 2 * self.num_layers * num_slots * self.block_size * self.num_kv_heads * self.head_dim
        energy = self.num_layers * num_slots * self.num_kv_heads * self.head_dim * 4 if self.codecs.prunes_keys else 0
        return rows * self.dtype.itemsize + energy

    def num_blocks_for(self, budget_bytes: int, num_slots: int = 0, extra_bytes_per_block: int = 0) -> int:
        """Blocks in ``budget_bytes`` after the residual reserve of ``num_slots``; ``extra_bytes_per_block``: what
        else each block holds (a draft model's rows)."""
        reserve = self.residual_bytes(num_slots)
        per_block = self.bytes_per_block + extra_bytes_per_block
        blocks = (budget_bytes - reserve) // per_block
        if blocks < 1:
            residual = f", after {reserve} bytes of residual for {num_slots} sequences" if reserve else ""
            raise ConfigError(
                f"kv_cache_memory of {budget_bytes} bytes holds no block (one block takes {per_block} bytes{residual})"
            )
        return int(blocks)


def allocate_kv_cache(
    layout: KVCacheLayout, num_blocks: int, device: torch.device, num_slots: int = 0
) -> list[tuple[KVCache, KVCache]]:
    """``num_slots``: residual slots (running sequences) under block codecs."""
    shape = (num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)
    codecs = layout.block_codecs()
    if codecs is not None:
        key_codec, value_codec = codecs
        kv_shape = (layout.block_size, layout.num_kv_heads, layout.head_dim, layout.dtype, device)

        def coded(codec: BlockCodec, tracks_queries: bool) -> CodecCache:
            return CodecCache(codec, num_blocks, num_slots, *kv_shape, tracks_queries=tracks_queries)

        prunes = layout.codecs.prunes_keys
        return [(coded(key_codec, prunes), coded(value_codec, False)) for _ in range(layout.num_layers)]
    bits = layout.bits

    def one() -> PagedCache:
        if bits is None:
            return torch.zeros(shape, dtype=layout.dtype, device=device)
        return QuantizedCache.allocate(*shape, bits, device)

    return [(one(), one()) for _ in range(layout.num_layers)]
