"""Block codecs: how one full KV block of one layer's keys or values is compressed once it fills.

A codec turns ``n`` blocks ``[n, block_size, kv_heads, head_dim]`` (fp32) into named tensors, each with a leading
block dimension (its ``fields``: the per-block shape and dtype), and back. ``bytes_per_block`` is exactly what those
fields take, so the scheduler's block accounting is the memory accounting. The rows of a block that is still
filling stay in full precision (kernels/codec_cache.py), so a codec always sees whole blocks.

- ``GroupQuantizer``: asymmetric uniform quantization to 2, 4 or 8 bits with an fp16 scale and zero point per group,
  the group being one channel across the block's tokens (``per_channel``) or one token's channels (per token).
- ``GearCodec``: GEAR's outliers + quantization + low-rank error.
- ``ChannelPruner``: ThinK's key-channel pruning in front of an inner codec.
- ``PlainCodec``: the rows as they are, in the model's dtype (what ThinK keeps when nothing is quantized).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from kernels.packed_levels import pack_levels, quantize_levels, unpack_levels

FieldSpec = tuple[tuple[int, ...], torch.dtype]  # the shape one block takes, and the dtype
CODEC_BITS = (2, 4, 8)


class BlockCodec(ABC):
    fields: dict[str, FieldSpec]

    @abstractmethod
    def encode(self, blocks: torch.Tensor, query_energy: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """blocks [n, block_size, kv_heads, head_dim] -> one tensor [n, *shape] per field. ``query_energy``
        [n, kv_heads, head_dim]: the recent queries' squared magnitude per channel (for ThinK's key scores)."""

    @abstractmethod
    def decode(self, stored: dict[str, torch.Tensor]) -> torch.Tensor:
        """The fields of ``n`` blocks -> [n, block_size, kv_heads, head_dim] in fp32."""

    @property
    def bytes_per_block(self) -> int:
        return sum(math.prod(shape) * dtype.itemsize for shape, dtype in self.fields.values())


class PlainCodec(BlockCodec):
    def __init__(self, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
        self.fields = {"rows": ((block_size, kv_heads, head_dim), dtype)}

    def encode(self, blocks: torch.Tensor, query_energy: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {"rows": blocks.to(self.fields["rows"][1])}

    def decode(self, stored: dict[str, torch.Tensor]) -> torch.Tensor:
        return stored["rows"].float()


class GroupQuantizer(BlockCodec):
    """``value = level * scale + zero`` with ``zero`` the group's minimum and ``scale`` its range / (2^bits - 1),
    both stored as fp16 (KIVI's choice: at 2 bits an fp32 pair per 16-token channel group would outweigh the
    levels). Levels are rounded to nearest against the fp16-rounded scale and zero, so the error of an element is at
    most ``scale / 2`` plus the fp16 rounding of the zero point. ``8 // bits`` levels are packed into a byte along
    ``head_dim``, the first in the lowest bits.

    KIVI (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", arXiv:2402.02750)
    quantizes keys per channel, because a few key channels carry large magnitudes that would stretch every token's
    range, and values per token, because each output mixes values across tokens and per-token error stays local.
    """

    def __init__(self, block_size: int, kv_heads: int, head_dim: int, bits: int, per_channel: bool) -> None:
        if bits not in CODEC_BITS:
            raise ValueError(f"codec bits must be one of {CODEC_BITS}, got {bits}")
        if head_dim * bits % 8:
            raise ValueError(f"{head_dim} channels do not pack into whole bytes at {bits} bits")
        self.bits, self.per_channel = bits, per_channel
        groups = (1, kv_heads, head_dim) if per_channel else (block_size, kv_heads, 1)
        self.fields = {
            "levels": ((block_size, kv_heads, head_dim * bits // 8), torch.uint8),
            "scale": (groups, torch.float16),
            "zero": (groups, torch.float16),
        }

    def encode(self, blocks: torch.Tensor, query_energy: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        dim = 1 if self.per_channel else -1
        levels, scale, zero = quantize_levels(blocks.float(), dim, self.bits, torch.float16)
        return {"levels": pack_levels(levels, self.bits), "scale": scale, "zero": zero}

    def decode(self, stored: dict[str, torch.Tensor]) -> torch.Tensor:
        levels = unpack_levels(stored["levels"], self.bits)
        # One fused pass; exact like a multiply then an add, since an fp16 scale times a level of at most 8 bits
        # fits fp32's mantissa.
        return torch.addcmul(stored["zero"].float(), levels, stored["scale"].float())


class GearCodec(BlockCodec):
    """GEAR (Kang et al., 2024, "GEAR: An Efficient KV Cache Compression Recipe for Near-Lossless Generative
    Inference of LLM", arXiv:2403.05527): per block and KV head, the ``outliers`` largest-magnitude entries are kept
    exactly in a sparse side store (flat index in the block's ``block_size * head_dim`` entries, value in the
    model's dtype), the rest are quantized (``base``: KIVI's per-channel keys / per-token values), and the
    quantization error of that rest is approximated by a rank-``rank`` product ``A @ B`` (truncated SVD, fp16
    factors). Decoding adds the low-rank term to the dequantized block and writes the outliers back over it.
    """

    def __init__(
        self,
        base: GroupQuantizer,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        rank: int,
        outlier_fraction: float,
        dtype: torch.dtype,
    ) -> None:
        if block_size * head_dim > 2**15:
            raise ValueError(f"GEAR's outlier index (int16) cannot address {block_size * head_dim} entries a block")
        if not 0 <= rank <= min(block_size, head_dim):
            raise ValueError(f"kv_gear_rank must be between 0 and {min(block_size, head_dim)}, got {rank}")
        self.base, self.rank, self.head_dim = base, rank, head_dim
        self.num_outliers = round(outlier_fraction * block_size * head_dim)
        self.fields = {
            **{f"base.{name}": spec for name, spec in base.fields.items()},
            "low_rank_a": ((kv_heads, block_size, rank), torch.float16),
            "low_rank_b": ((kv_heads, rank, head_dim), torch.float16),
            "outlier_index": ((kv_heads, self.num_outliers), torch.int16),
            "outlier_value": ((kv_heads, self.num_outliers), dtype),
        }

    def encode(self, blocks: torch.Tensor, query_energy: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        x = blocks.float()
        n, block_size, kv_heads, head_dim = x.shape
        per_head = x.permute(0, 2, 1, 3).reshape(n, kv_heads, -1)  # [n, KVH, block_size * head_dim]
        index = per_head.abs().topk(self.num_outliers, dim=-1).indices
        outlier_value = per_head.gather(-1, index)
        inliers = per_head.scatter(-1, index, 0.0).view(n, kv_heads, block_size, head_dim).permute(0, 2, 1, 3)
        base = self.base.encode(inliers)
        error = (inliers - self.base.decode(base)).permute(0, 2, 1, 3)  # [n, KVH, block_size, head_dim]
        u, s, vh = torch.linalg.svd(error, full_matrices=False)
        a = (u[..., : self.rank] * s[..., None, : self.rank]).half()
        b = vh[..., : self.rank, :].half()
        return {
            **{f"base.{name}": tensor for name, tensor in base.items()},
            "low_rank_a": a,
            "low_rank_b": b,
            "outlier_index": index.to(torch.int16),
            "outlier_value": outlier_value.to(self.fields["outlier_value"][1]),
        }

    def decode(self, stored: dict[str, torch.Tensor]) -> torch.Tensor:
        base = self.base.decode({name: stored[f"base.{name}"] for name in self.base.fields})
        low_rank = stored["low_rank_a"].float() @ stored["low_rank_b"].float()  # [n, KVH, block_size, head_dim]
        per_head = (base.permute(0, 2, 1, 3) + low_rank).flatten(2)
        index = stored["outlier_index"].long()
        per_head.scatter_(-1, index, stored["outlier_value"].float())
        n, kv_heads, _ = per_head.shape
        return per_head.view(n, kv_heads, -1, self.head_dim).permute(0, 2, 1, 3).contiguous()


class ChannelPruner(BlockCodec):
    """ThinK (Xu et al., 2024, "ThinK: Thinner Key Cache by Query-Driven Pruning", arXiv:2407.21018) for keys:
    per block and KV head, each channel ``i`` is scored by the magnitude of its query-key interaction,
    ``||Q_w[:, i]|| * ||K[:, i]||`` (the Frobenius norm of the rank-one product ``Q_w[:, i] K[:, i]^T``, with ``Q_w``
    the recent queries of the KV head's group), and only the best ``keep`` channels are stored, through ``inner``.
    Decoding returns zeros in the pruned channels, which is masking the queries to the kept channels of each block.
    """

    def __init__(self, inner: BlockCodec, kv_heads: int, head_dim: int, keep: int) -> None:
        if not 0 < keep < min(head_dim, 256):
            raise ValueError(f"kept key channels must be between 1 and {min(head_dim, 256) - 1}, got {keep}")
        self.inner, self.head_dim, self.keep = inner, head_dim, keep
        self.fields = {"channels": ((kv_heads, keep), torch.uint8), **inner.fields}

    def encode(self, blocks: torch.Tensor, query_energy: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if query_energy is None:
            raise ValueError("key-channel pruning scores channels by the recent queries, and none were given")
        x = blocks.float()
        scores = query_energy.sqrt() * x.norm(dim=1)  # [n, KVH, head_dim]
        channels = scores.topk(self.keep, dim=-1).indices.sort(dim=-1).values
        kept = x.gather(-1, channels.unsqueeze(1).expand(-1, x.shape[1], -1, -1))
        return {"channels": channels.to(torch.uint8), **self.inner.encode(kept)}

    def decode(self, stored: dict[str, torch.Tensor]) -> torch.Tensor:
        kept = self.inner.decode({name: stored[name] for name in self.inner.fields})
        n, block_size, kv_heads, _ = kept.shape
        out = kept.new_zeros(n, block_size, kv_heads, self.head_dim)
        return out.scatter_(-1, stored["channels"].long().unsqueeze(1).expand(-1, block_size, -1, -1), kept)


KV_CODECS = ("none", "kivi", "gear")


@dataclass(frozen=True)
class CodecSettings:
    """The configured block codecs (config ``kv_codec`` and friends); ``active`` when any block is compressed."""

    codec: str = "none"  # none | kivi | gear
    bits: int = 4
    gear_rank: int = 2
    gear_outlier_fraction: float = 0.02
    key_channel_keep: float = 1.0  # ThinK: the fraction of key channels kept; 1: no pruning
    token_bits: int | None = None  # kv_cache_dtype int8/int4 with ThinK: kept key channels and values per token

    def __post_init__(self) -> None:
        if self.codec not in KV_CODECS:
            raise ValueError(f"kv_codec must be one of {', '.join(KV_CODECS)}, got {self.codec!r}")
        if self.bits not in CODEC_BITS:
            raise ValueError(f"kv_codec_bits must be one of {CODEC_BITS}, got {self.bits}")
        if not 0 <= self.gear_outlier_fraction < 1:
            raise ValueError(f"kv_gear_outlier_fraction must be in [0, 1), got {self.gear_outlier_fraction}")
        if not 0 < self.key_channel_keep <= 1:
            raise ValueError(f"kv_key_channel_keep must be in (0, 1], got {self.key_channel_keep}")
        if self.codec != "none" and self.token_bits is not None:
            raise ValueError(
                f"kv_codec {self.codec} quantizes the blocks itself: leave kv_cache_dtype auto, or set kv_codec none"
            )

    @property
    def active(self) -> bool:
        return self.codec != "none" or self.key_channel_keep < 1

    @property
    def read_in_kernels(self) -> bool:
        """Whether attention kernels can read the sealed blocks as stored: KIVI's group quantization alone. GEAR's
        low-rank and sparse terms and ThinK's per-block channel choice are decoded into a working set first."""
        return self.codec == "kivi" and not self.prunes_keys

    @property
    def prunes_keys(self) -> bool:
        return self.key_channel_keep < 1

    def describe(self) -> str:
        """``kivi-int2``, ``gear-int4-r2-o0.02``, ``think-0.5+int4``, ``none``."""
        parts = []
        if self.codec == "kivi":
            parts.append(f"kivi-int{self.bits}")
        elif self.codec == "gear":
            parts.append(f"gear-int{self.bits}-r{self.gear_rank}-o{self.gear_outlier_fraction:g}")
        if self.prunes_keys:
            parts.append(f"think-{self.key_channel_keep:g}")
        if self.token_bits is not None:
            parts.append(f"int{self.token_bits}")
        return "+".join(parts) or "none"

    def build(self, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> tuple[BlockCodec, BlockCodec]:
        """The key and value codecs; ValueError for shapes the settings cannot apply to."""
        kept = round(self.key_channel_keep * head_dim) if self.prunes_keys else head_dim

        def base(width: int, per_channel: bool) -> BlockCodec:
            if self.codec == "none":
                if self.token_bits is None:
                    return PlainCodec(block_size, kv_heads, width, dtype)
                return GroupQuantizer(block_size, kv_heads, width, self.token_bits, per_channel=False)
            quantizer = GroupQuantizer(block_size, kv_heads, width, self.bits, per_channel)
            if self.codec == "kivi":
                return quantizer
            rank, fraction = self.gear_rank, self.gear_outlier_fraction
            return GearCodec(quantizer, block_size, kv_heads, width, rank, fraction, dtype)

        key = base(kept, per_channel=True)
        if self.prunes_keys:
            key = ChannelPruner(key, kv_heads, head_dim, kept)
        return key, base(head_dim, per_channel=False)
