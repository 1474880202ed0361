"""Row counts rounded up to a few sizes, for CPU kernels that compile and keep one kernel per input shape.

PyTorch's reduced-precision CPU kernels (oneDNN matmuls, and the brgemm micro-kernels inside its fused attention)
build a kernel for each new shape and keep it, about a megabyte each. A server sees every row count a step or a
prompt can have, so without rounding, resident memory grows for as long as new lengths keep arriving (measured: one
causal bf16 attention per length from 40 to 1238 tokens grew by 886 MiB; the same lengths in buckets, 35 MiB).
fp32 compiles nothing per shape, so it is left alone.
"""

from __future__ import annotations

import torch

BUCKETED_DTYPES = (torch.bfloat16, torch.float16)


def bucket_rows(rows: int) -> int:
    """The padded row count: powers of two up to 8, multiples of 8 up to 64, then eight sizes per power of two
    (at most an eighth of padding; a power-of-two count is its own bucket)."""
    if rows <= 8:
        return 1 << max(rows - 1, 0).bit_length()
    step = 8 if rows <= 64 else 1 << ((rows - 1).bit_length() - 4)
    return -(-rows // step) * step


def bucket_sizes(max_rows: int) -> list[int]:
    """Every bucket a count of 1 to ``max_rows`` rows falls into, smallest first."""
    return sorted({bucket_rows(rows) for rows in range(1, max_rows + 1)})
