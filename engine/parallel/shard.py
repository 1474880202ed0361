"""Which slice of the model each tensor-parallel rank holds, and how a full weight is cut to that slice.

Attention is split by whole KV-head groups (a KV head and the query heads that read it stay on one rank, so
attention needs no communication), as evenly as the KV heads allow: 3 KV heads over 2 ranks give rank 0 two of
them and rank 1 one. The MLP's intermediate dimension is split as evenly as possible. The vocabulary is padded to a
multiple of the rank count so that every rank's logits have the same width and can be gathered in one collective.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from engine.errors import ConfigError
from engine.model_spec import ModelSpec


def _even_split(total: int, parts: int, index: int) -> tuple[int, int]:
    """[start, end) of part ``index`` of ``total`` items in ``parts`` contiguous parts; earlier parts get the rest."""
    base, extra = divmod(total, parts)
    start = index * base + min(index, extra)
    return start, start + base + (index < extra)


@dataclass(frozen=True)
class TensorShard:
    """Rank ``rank`` of ``world_size``: the ranges of heads, KV heads, intermediate units and vocabulary it holds."""

    rank: int
    world_size: int
    kv_heads: tuple[int, int]
    heads: tuple[int, int]
    intermediate: tuple[int, int]
    vocab: tuple[int, int]  # rows of the padded vocabulary; rows at or past the real vocabulary are zero
    vocab_size: int  # the real vocabulary, for cutting the gathered logits back

    @classmethod
    def whole(cls, spec: ModelSpec) -> TensorShard:
        return cls.of(spec, 0, 1)

    @classmethod
    def of(cls, spec: ModelSpec, rank: int, world_size: int) -> TensorShard:
        if world_size > spec.num_kv_heads:
            raise ConfigError(
                f"tensor_parallel_size {world_size} exceeds the model's {spec.num_kv_heads} KV heads "
                "(each rank needs at least one)"
            )
        group = spec.num_heads // spec.num_kv_heads
        kv_start, kv_end = _even_split(spec.num_kv_heads, world_size, rank)
        per_rank_vocab = -(-spec.vocab_size // world_size)
        return cls(
            rank=rank,
            world_size=world_size,
            kv_heads=(kv_start, kv_end),
            heads=(kv_start * group, kv_end * group),
            intermediate=_even_split(spec.intermediate_size, world_size, rank),
            vocab=(rank * per_rank_vocab, (rank + 1) * per_rank_vocab),
            vocab_size=spec.vocab_size,
        )

    def local_spec(self, spec: ModelSpec) -> ModelSpec:
        """The spec this rank's modules are built from: its own heads, intermediate units and vocabulary rows."""
        return dataclasses.replace(
            spec,
            num_heads=self.heads[1] - self.heads[0],
            num_kv_heads=self.kv_heads[1] - self.kv_heads[0],
            intermediate_size=self.intermediate[1] - self.intermediate[0],
            vocab_size=self.vocab[1] - self.vocab[0],
        )

    def cut(self, name: str, weight: torch.Tensor, head_dim: int) -> torch.Tensor:
        """This rank's part of the Hugging Face-named full ``weight``: output rows of the column-parallel
        projections, input columns of the row-parallel ones, vocabulary rows (zero-padded) of the embedding and
        LM head; norms whole."""
        if self.world_size == 1:
            return weight
        module = name.split(".")[-2] if name.count(".") else ""
        rows = {
            "q_proj": tuple(h * head_dim for h in self.heads),
            "k_proj": tuple(h * head_dim for h in self.kv_heads),
            "v_proj": tuple(h * head_dim for h in self.kv_heads),
            "gate_proj": self.intermediate,
            "up_proj": self.intermediate,
        }
        columns = {"o_proj": tuple(h * head_dim for h in self.heads), "down_proj": self.intermediate}
        if module in rows:
            start, end = rows[module]
            return weight[start:end]
        if module in columns:
            start, end = columns[module]
            return weight[:, start:end]
        if module in ("embed_tokens", "lm_head"):
            start, end = self.vocab
            part = weight[start : min(end, self.vocab_size)]
            return torch.nn.functional.pad(part, (0, 0, 0, end - start - part.shape[0]))
        return weight
