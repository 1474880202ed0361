"""A paged KV cache whose full blocks are compressed by a block codec and whose filling blocks stay in full precision.

Each sequence owns a *residual slot*: two blocks' worth of rows in the model's dtype (kernels/kv_codecs.py keeps
the method). A sequence's last block, while it fills, lives in one of its slot's two buffers; the step that fills
it encodes the whole block into the compressed store (``sealed``) and starts the next block in the other buffer.
So the most recent ``cache_position % block_size`` rows of every sequence (at most a block less one) are exact, as
KIVI keeps its recent tokens, and every sealed block is a deterministic function of its own rows, which is what
prefix caching needs (except under ThinK, whose channel choice also depends on the request's queries). Two buffers
make a step re-runnable: a retried step reads the rows the first attempt read, since the first attempt wrote its
new partial block into the other buffer (engine/kv_policy/residuals.py picks the buffers).

For ThinK, a key cache also keeps each slot's query energy: per KV head and channel, the squared queries of the
head's group, decayed by ``1 - 1 / window`` per token, so that it weighs about the last ``window`` queries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.backend import BatchLayout
from kernels.kv_codecs import BlockCodec


@dataclass(frozen=True)
class CodecStep:
    """One step's bookkeeping, shared by every layer: where each new row goes in a staging set of the blocks the
    step writes to, which staged blocks are seeded from a residual buffer, which get sealed and which go back."""

    staging_rows: torch.Tensor  # [T]: each new row's row in the staging set (staged block * block_size + offset)
    num_staged: int
    seed_staged: torch.Tensor  # staged blocks whose first rows are in a residual buffer ...
    seed_buffers: torch.Tensor  # ... that one
    sealed_staged: torch.Tensor  # staged blocks that are full after the step ...
    sealed_blocks: torch.Tensor  # ... their cache blocks ...
    sealed_slots: torch.Tensor  # ... and their sequence's residual slot (for the query energy)
    partial_staged: torch.Tensor  # staged blocks still filling after the step ...
    partial_buffers: torch.Tensor  # ... the residual buffer they go to ...
    partial_working: torch.Tensor  # ... and their index in the step's working set (if any)
    token_slots: torch.Tensor  # [T]: each new row's sequence's residual slot
    token_decay: torch.Tensor  # [T]: decay^(rows after it in its sequence this step)
    sequence_slots: torch.Tensor  # [S]: each sequence's residual slot ...
    sequence_decay: torch.Tensor  # ... and the decay its older energy takes (0 for a sequence starting over)


def codec_step(
    layout: BatchLayout, residual_buffers: list[tuple[int, int]], working_index: dict[int, int] | None, decay: float
) -> CodecStep:
    """``residual_buffers``: per sequence, the buffer its partial block is read from and the one it goes to;
    ``working_index``: each cache block's index in the working set ``read_blocks`` decodes (None: no working set,
    as when the Triton kernels read the blocks in place)."""
    block_size = layout.block_size
    staging_rows, seed_staged, seed_buffers = [], [], []
    sealed_staged, sealed_blocks, sealed_slots = [], [], []
    partial_staged, partial_buffers, partial_working = [], [], []
    token_slots, token_decay, sequence_slots, sequence_decay = [], [], [], []
    staged = 0
    for query_len, context_len, table, (read, write) in zip(
        layout.query_lens, layout.context_lens, layout.block_tables, residual_buffers
    ):
        start = context_len - query_len
        first, last = start // block_size, (context_len - 1) // block_size
        if start % block_size:
            seed_staged.append(staged)
            seed_buffers.append(read)
        staging_rows.extend(staged * block_size + row - first * block_size for row in range(start, context_len))
        for index in range(first, last + 1):
            if (index + 1) * block_size <= context_len:
                sealed_staged.append(staged)
                sealed_blocks.append(table[index])
                sealed_slots.append(read // 2)
            else:
                partial_staged.append(staged)
                partial_buffers.append(write)
                if working_index is not None:
                    partial_working.append(working_index[table[index]])
            staged += 1
        token_slots.extend([read // 2] * query_len)
        token_decay.extend(decay ** (query_len - 1 - i) for i in range(query_len))
        sequence_slots.append(read // 2)
        sequence_decay.append(decay**query_len if start else 0.0)

    def longs(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=layout.slot_mapping.device)

    def floats(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=layout.slot_mapping.device)

    return CodecStep(
        longs(staging_rows),
        staged,
        longs(seed_staged),
        longs(seed_buffers),
        longs(sealed_staged),
        longs(sealed_blocks),
        longs(sealed_slots),
        longs(partial_staged),
        longs(partial_buffers),
        longs(partial_working),
        longs(token_slots),
        floats(token_decay),
        longs(sequence_slots),
        floats(sequence_decay),
    )


class CodecCache:
    """One layer's keys or values: ``sealed`` fields [num_blocks, ...] of ``codec``, residual buffers
    [2 * num_slots, block_size, kv_heads, head_dim] in the model's dtype, and (keys under ThinK) the query energy
    [num_slots, kv_heads, head_dim]."""

    def __init__(
        self,
        codec: BlockCodec,
        num_blocks: int,
        num_slots: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        tracks_queries: bool,
    ) -> None:
        self.codec = codec
        self.sealed = {
            name: torch.zeros(num_blocks, *shape, dtype=field_dtype, device=device)
            for name, (shape, field_dtype) in codec.fields.items()
        }
        self.residual = torch.zeros(2 * num_slots, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.query_energy = (
            torch.zeros(num_slots, num_kv_heads, head_dim, dtype=torch.float32, device=device)
            if tracks_queries
            else None
        )

    @property
    def block_size(self) -> int:
        return self.residual.shape[1]

    def write(self, rows: torch.Tensor, step: CodecStep, queries: torch.Tensor | None = None) -> None:
        """Stage the new rows [T, KVH, D] behind their block's residual rows; seal the blocks they fill, keep the
        rest in their sequence's residual buffer. ``queries`` [T, H, D]: the step's queries (ThinK's keys)."""
        if self.query_energy is not None:
            self._track(queries, step)
        _, block_size, kv_heads, head_dim = self.residual.shape
        staging = torch.zeros(step.num_staged, block_size, kv_heads, head_dim, dtype=torch.float32, device=rows.device)
        staging.index_copy_(0, step.seed_staged, self.residual.index_select(0, step.seed_buffers).float())
        staging.view(-1, kv_heads, head_dim).index_copy_(0, step.staging_rows, rows.float())
        if step.sealed_staged.numel():
            energy = None
            if self.query_energy is not None:
                energy = self.query_energy.index_select(0, step.sealed_slots)
            encoded = self.codec.encode(staging.index_select(0, step.sealed_staged), energy)
            for name, values in encoded.items():
                self.sealed[name].index_copy_(0, step.sealed_blocks, values)
        partial = staging.index_select(0, step.partial_staged).to(self.residual.dtype)
        self.residual.index_copy_(0, step.partial_buffers, partial)

    def read_blocks(self, block_ids: torch.Tensor, dtype: torch.dtype, step: CodecStep) -> torch.Tensor:
        """Blocks [len(block_ids), block_size, KVH, D] as attention sees them: sealed blocks decoded, each of the
        step's filling blocks from its residual buffer (after ``write``)."""
        decoded = self.codec.decode({name: field.index_select(0, block_ids) for name, field in self.sealed.items()})
        decoded = decoded.to(dtype)
        decoded.index_copy_(0, step.partial_working, self.residual.index_select(0, step.partial_buffers).to(dtype))
        return decoded

    def _track(self, queries: torch.Tensor | None, step: CodecStep) -> None:
        assert queries is not None and self.query_energy is not None
        kv_heads = self.query_energy.shape[1]
        squared = queries.float().square()
        squared = squared.view(squared.shape[0], kv_heads, -1, squared.shape[-1]).sum(2)  # [T, KVH, D]
        energy = self.query_energy
        older = energy.index_select(0, step.sequence_slots) * step.sequence_decay[:, None, None]
        energy.index_copy_(0, step.sequence_slots, older)
        energy.index_add_(0, step.token_slots, squared * step.token_decay[:, None, None])
