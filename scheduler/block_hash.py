"""Chained hashes of full KV-cache blocks, the keys of the prefix cache.

A block's hash covers its tokens and its parent's hash, so equal hashes imply equal whole prefixes. Hashes use
blake2b over a fixed little-endian encoding rather than Python's ``hash``: str hashing is salted per process and the
tuple hash algorithm is a CPython detail, while a disk tier must find the same keys after a restart.
"""

import hashlib
import struct
from collections.abc import Sequence

_ROOT = b"\x00"
_CHILD = b"\x01"


def hash_block_tokens(parent_hash: int | None, tokens: Sequence[int]) -> int:
    """64-bit hash of one full block, chained on the previous block's hash (None for the first block)."""
    h = hashlib.blake2b(digest_size=8)
    # The tag byte keeps "no parent" distinct from any parent value.
    h.update(_ROOT if parent_hash is None else _CHILD + parent_hash.to_bytes(8, "little"))
    h.update(struct.pack(f"<{len(tokens)}q", *tokens))
    return int.from_bytes(h.digest(), "little")


def extend_block_hashes(block_hashes: list[int], token_ids: Sequence[int], block_size: int) -> None:
    """Append the hashes of the full blocks of ``token_ids`` that ``block_hashes`` does not cover yet.

    Only new blocks are hashed, so keeping the list across steps costs O(new tokens) per step.
    """
    parent = block_hashes[-1] if block_hashes else None
    for start in range(len(block_hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        parent = hash_block_tokens(parent, token_ids[start : start + block_size])
        block_hashes.append(parent)
