"""The persistent prefix-cache tier: one file per full KV block, keyed by its chained block hash (LMCache style).

Layout: ``<directory>/<identity>/<block hash>.kvb``. The identity digests the file format version, the model (its
architecture and a fingerprint of its weight files), the dtype, the KV-cache codec, the block size and which steps
run on 4-bit weight copies, so another model, codec or weight format never reads these blocks. Each file is a
header then the block's bytes::

    magic "SPKV" | format version u16 | reserved u16 | identity 16 B | block hash u64 | payload length u64 |
    CRC-32 of the payload u32 | payload

Files are written by a background thread to a temporary name and renamed, and a block joins the index only after
the rename, so a block is never served before its file is complete. A read checks every header field and the
checksum; a file that fails (flipped bytes, truncation, another writer's format) is logged, deleted and reported as
a miss, so the block is recomputed. CRC-32 detects accidental corruption; the directory itself is trusted. The store
is bounded in bytes: once past the bound, the least recently used files go (use is kept in file mtimes, so the order
survives a restart).

The tier is an optimisation, so a failing disk never fails a request: an I/O error on a lookup is a miss, on a write
the block is not stored, each kind of error is logged once, and MAX_CONSECUTIVE_IO_ERRORS in a row take the store
offline for the rest of the process (lookups miss without touching the disk, nothing is written).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import os
import queue
import struct
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger("spindle.kv_offload")

FORMAT_VERSION = 1
_MAGIC = b"SPKV"
_HEADER = struct.Struct("<4sHH16sQQI")
_SUFFIX = ".kvb"
# Blocks waiting for the writer thread, at most: past it new blocks are not stored (counted), so a slow disk never
# stalls a model step or grows memory without bound.
MAX_PENDING_BYTES = 256 * 2**20
# Verified blocks held for requests that could not be admitted yet, at most.
MAX_STAGED_BYTES = 256 * 2**20
_STALE_TEMPORARY_SECONDS = 3600
# I/O errors in a row, with no successful read or write in between, that take the store offline. A failure costs no
# more than a miss, so tolerating a few is cheap, and a success resets the count, so one unreadable file or a brief
# hiccup leaves the tier on; a dead, unmounted or read-only disk fails every operation and gets here within a request
# or two, after which the engine stops copying blocks for a disk that drops them and stops logging about it.
MAX_CONSECUTIVE_IO_ERRORS = 5
# What a failed file operation means for the block, for its warning.
_CONSEQUENCES = {
    "lookup": "counted as a miss, the block is recomputed",
    "write": "the block is not stored",
    "delete": "the file is left in place",
}


@dataclass
class DiskStoreCounters:
    """Cumulative: blocks served from disk and bytes read, lookups that found nothing usable, blocks and bytes
    written, corrupt files rejected, blocks not stored because the writer was behind, failed file operations; and
    the bytes stored now."""

    hits: int = 0
    misses: int = 0
    read_bytes: int = 0
    written_blocks: int = 0
    written_bytes: int = 0
    corrupt_files: int = 0
    dropped_writes: int = 0
    io_errors: int = 0
    stored_bytes: int = 0  # now, not cumulative: the files in the store


class DiskPrefixStore:
    """The store over one directory; ``lookup`` / ``payload`` / ``end_step`` run on the engine thread, files are
    written on the store's own thread."""

    def __init__(
        self,
        directory: str | Path,
        max_bytes: int,
        identity: bytes,
        bytes_per_block: int,
        max_consecutive_errors: int = MAX_CONSECUTIVE_IO_ERRORS,
    ) -> None:
        if len(identity) != 16:
            raise ValueError("identity must be a 16-byte digest")
        self.directory = Path(directory) / identity.hex()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.identity = identity
        self.bytes_per_block = bytes_per_block
        self.counters = DiskStoreCounters()
        self._lock = threading.Lock()
        self._index: OrderedDict[int, int] = OrderedDict()  # block hash -> file size, least recently used first
        self._staged: dict[int, torch.Tensor] = {}  # verified payloads of lookups, until loaded
        self._loaded: set[int] = set()  # staged payloads loaded this step
        self._pending: set[int] = set()
        self._pending_bytes = 0
        self._queue: queue.Queue[tuple[int, torch.Tensor] | None] = queue.Queue()
        self._max_consecutive_errors = max_consecutive_errors
        self._consecutive_errors = 0
        self._logged_errors: set[tuple[str, int | str]] = set()  # (operation, errno or exception name)
        self._online = True
        self._scan()
        self._writer = threading.Thread(target=self._write_loop, name="spindle-kv-disk-writer", daemon=True)
        self._writer.start()
        atexit.register(self.close)  # an offline run that never closes the engine still keeps its blocks

    @property
    def num_blocks(self) -> int:
        return len(self._index)

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._index

    @property
    def online(self) -> bool:
        """False once repeated I/O errors took the store offline: lookups miss and blocks are not stored."""
        return self._online

    # ------------------------------------------------------------------ engine thread
    def lookup(self, block_hash: int) -> bool:
        """Read and verify the block's file, and keep its payload for ``payload`` (see ``end_step``)."""
        if not self._online:
            self.counters.misses += 1
            return False
        if block_hash in self._staged:
            return True
        with self._lock:
            found = block_hash in self._index
            if found:
                self._index.move_to_end(block_hash)
        if not found:
            self.counters.misses += 1
            return False
        path = self._path(block_hash)
        try:
            data = self._read(path)
        except FileNotFoundError:  # evicted by the writer thread since the index was read
            self.counters.misses += 1
            return False
        except OSError as exc:
            # Forgotten, so a request waiting for admission does not hit the same error every step; a new write of
            # the block replaces the file.
            self._forget(block_hash)
            self.counters.misses += 1
            self._io_error("lookup", exc)
            return False
        self._io_succeeded()
        problem = self._check(block_hash, data)
        if problem is not None:
            logger.warning("prefix store: %s is corrupt (%s); deleted, the block will be recomputed", path, problem)
            self.counters.corrupt_files += 1
            self.counters.misses += 1
            self._remove(block_hash)
            return False
        self._staged[block_hash] = torch.frombuffer(data, dtype=torch.uint8, offset=_HEADER.size)
        return True

    def payload(self, block_hash: int) -> torch.Tensor:
        """The block's bytes found by ``lookup``; counts a hit."""
        payload = self._staged[block_hash]
        self._loaded.add(block_hash)
        self.counters.hits += 1
        self.counters.read_bytes += payload.numel()
        return payload

    def end_step(self) -> None:
        """Drop the payloads loaded this step (their KV blocks hold them now). Payloads of lookups whose request was
        not admitted stay, so a request waiting at the head of the queue does not read its files every step, up to
        MAX_STAGED_BYTES."""
        for block_hash in self._loaded:
            self._staged.pop(block_hash, None)
        self._loaded.clear()
        if not self._online or len(self._staged) * self.bytes_per_block > MAX_STAGED_BYTES:
            self._staged.clear()

    def put(self, block_hash: int, payload: torch.Tensor) -> None:
        """Queue a block for writing unless it is stored or queued already, or the store is offline; ``payload`` must
        not change after."""
        if not self._online or block_hash in self._index or block_hash in self._pending:
            return
        if self._pending_bytes + payload.numel() > MAX_PENDING_BYTES:
            self.counters.dropped_writes += 1
            return
        with self._lock:
            self._pending.add(block_hash)
            self._pending_bytes += payload.numel()
        self._queue.put((block_hash, payload))

    def flush(self) -> None:
        """Wait until every queued block is written."""
        self._queue.join()

    def close(self) -> None:
        """Write what is queued, then stop the writer thread."""
        if self._writer.is_alive():
            self._queue.put(None)
            self._writer.join()

    # ------------------------------------------------------------------ files
    def _path(self, block_hash: int) -> Path:
        return self.directory / f"{block_hash:016x}{_SUFFIX}"

    @staticmethod
    def _read(path: Path) -> bytearray:
        """The file's bytes; marks it used (its mtime orders eviction)."""
        with open(path, "rb") as file:
            data = bytearray(os.fstat(file.fileno()).st_size)
            file.readinto(data)
        os.utime(path)
        return data

    def _io_succeeded(self) -> None:
        with self._lock:
            self._consecutive_errors = 0

    def _io_error(self, operation: str, exc: OSError) -> None:
        """Count a failed file operation (any thread): logged once per operation and kind of error, and
        MAX_CONSECUTIVE_IO_ERRORS in a row take the store offline."""
        cause = (operation, exc.errno if exc.errno is not None else type(exc).__name__)
        with self._lock:
            self.counters.io_errors += 1
            self._consecutive_errors += 1
            in_a_row = self._consecutive_errors
            first_of_its_kind = cause not in self._logged_errors
            self._logged_errors.add(cause)
            going_offline = self._online and in_a_row >= self._max_consecutive_errors
            if going_offline:
                self._online = False
        if first_of_its_kind:
            logger.warning(
                "prefix store: %s failed in %s: %s; %s (logged once per kind of error)",
                operation,
                self.directory,
                exc,
                _CONSEQUENCES[operation],
            )
        if going_offline:
            logger.warning(
                "prefix store: %d I/O errors in a row; the disk tier in %s is offline until restart, prefixes are "
                "recomputed",
                in_a_row,
                self.directory,
            )

    def _unlink(self, path: Path) -> None:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            self._io_error("delete", exc)

    def _check(self, block_hash: int, data: bytearray) -> str | None:
        """Why the file's bytes cannot be served as the block, or None if they can."""
        if len(data) < _HEADER.size:
            return f"{len(data)} bytes, shorter than the header"
        magic, version, _, identity, stored_hash, length, checksum = _HEADER.unpack_from(data)
        if magic != _MAGIC or version != FORMAT_VERSION:
            return f"not a version {FORMAT_VERSION} block file"
        if identity != self.identity or stored_hash != block_hash:
            return "written for another model, codec or block"
        if length != self.bytes_per_block or len(data) - _HEADER.size != length:
            return f"payload of {len(data) - _HEADER.size} bytes, expected {self.bytes_per_block}"
        if zlib.crc32(memoryview(data)[_HEADER.size :]) != checksum:
            return "checksum mismatch"
        return None

    def _scan(self) -> None:
        """Index the files a previous run left, least recently used first; contents are checked when read."""
        entries = []
        for path in self.directory.glob(f"*{_SUFFIX}"):
            try:
                block_hash = int(path.stem, 16)
                stat = path.stat()
            except (ValueError, OSError):
                continue
            entries.append((stat.st_mtime_ns, block_hash, stat.st_size))
        for _, block_hash, size in sorted(entries):
            self._index[block_hash] = size
            self.counters.stored_bytes += size
        # A write that a previous run left unfinished (a live writer renames its file within milliseconds).
        for path in self.directory.glob("*.tmp"):
            with contextlib.suppress(OSError):
                if time.time() - path.stat().st_mtime > _STALE_TEMPORARY_SECONDS:
                    path.unlink()
        self._evict_over_bound()

    def _forget(self, block_hash: int) -> None:
        """Drop the block from the index (its file, if any, stays)."""
        with self._lock:
            size = self._index.pop(block_hash, None)
            if size is not None:
                self.counters.stored_bytes -= size

    def _remove(self, block_hash: int) -> None:
        self._forget(block_hash)
        self._unlink(self._path(block_hash))

    def _evict_over_bound(self) -> None:
        while True:
            with self._lock:
                if self.counters.stored_bytes <= self.max_bytes or not self._index:
                    return
                block_hash, size = self._index.popitem(last=False)
                self.counters.stored_bytes -= size
            self._unlink(self._path(block_hash))

    # ------------------------------------------------------------------ writer thread
    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._online:  # else drained unwritten
                    self._write(*item)
            except OSError as exc:  # a full or read-only disk: the block is simply not stored
                self._io_error("write", exc)
            finally:
                if item is not None:
                    with self._lock:
                        self._pending.discard(item[0])
                        self._pending_bytes -= item[1].numel()
                self._queue.task_done()

    def _write(self, block_hash: int, payload: torch.Tensor) -> None:
        data = memoryview(payload.numpy())
        header = _HEADER.pack(_MAGIC, FORMAT_VERSION, 0, self.identity, block_hash, len(data), zlib.crc32(data))
        path = self._path(block_hash)
        temporary = path.with_name(f"{path.stem}.{os.getpid()}.tmp")  # unique if two servers share the directory
        try:
            with open(temporary, "wb") as file:
                file.write(header)
                file.write(data)
            os.replace(temporary, path)
        except OSError:
            with contextlib.suppress(OSError):  # the original error is the one to report
                temporary.unlink(missing_ok=True)
            raise
        size = len(header) + len(data)
        with self._lock:
            self._consecutive_errors = 0
            self._index[block_hash] = size
            self.counters.stored_bytes += size
        self.counters.written_blocks += 1
        self.counters.written_bytes += size
        self._evict_over_bound()


def model_identity(parts: dict[str, object], files: list[Path]) -> bytes:
    """16-byte digest of the format version, ``parts`` (model spec, dtype, codec, block size) and the model files'
    names, sizes and first and last mebibyte: cheap to compute at start-up, different for different weights."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"spindle-kv-v{FORMAT_VERSION}".encode())
    digest.update(repr(sorted(parts.items())).encode())
    for path in sorted(files):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as file:
            digest.update(file.read(2**20))
            file.seek(max(0, size - 2**20))
            digest.update(file.read(2**20))
    return digest.digest()
