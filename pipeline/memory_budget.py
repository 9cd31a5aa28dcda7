"""The worker's memory budget: what one process may hold resident, and how much of it the hot
document sessions get.

    memory_budget_bytes  = baseline (model, tokenizer, torch, Faust; measured at start)
                         + reserve (memory_reserve_bytes: a chunk build's activations, Kafka
                                    buffers, RocksDB memtables, allocator slack)
                         + sessions (the hot cache; capped by session_cache_bytes)

A session's size is known before it is built: rows (at most tokens + 2 per chunk, see
engine.incremental.chunks.max_rows) x bytes per row of the engine mode, measured on a warm-up
session at start (exact ~116 KB a row, fast ~15 KB). So the cache evicts before it builds, and a
document whose session could never fit (or that is over max_document_tokens) is not built at
all: it gets a `document_too_large` dead letter (pipeline.document_sessions).

Linux/glibc specifics: resident memory is read from /proc. glibc keeps freed blocks in its
heaps: measured on a 4,597-token exact session, RSS grew 140 KB a token and stayed there after
the session was freed. `return_freed_memory` (malloc_trim(0): every arena, every whole free
page) gives those pages back; the session cache calls it after it evicts. An earlier version
instead served every block over 128 KB with mmap (a fixed mmap threshold), which returns a
session's pages at once but maps and zero-fills every activation temporary of every update
afresh: the fast mode's updates took 1.06-1.25x as long (median) and its chunk rebuilds
1.6-1.8x (p90), on 447 typed edits replayed in one process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("incstream.memory")

@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library, loaded once (find_library runs ldconfig), if it is glibc."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim  # noqa: B018 (glibc's; musl and others lack it)
    except (OSError, AttributeError):
        return None
    return libc


def return_freed_memory() -> bool:
    """Give the pages of freed blocks back to the system (glibc's malloc_trim(0)); False where
    the C library is not glibc (nothing changes there). A few ms on a large heap: call it after
    freeing something large (an evicted session), not per event."""
    libc = _glibc()
    return libc is not None and bool(libc.malloc_trim(0))


def _status_kib(field: str, pid: int | str) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def resident_bytes(pid: int | str = "self") -> int | None:
    """Resident set size (VmRSS) of a process, or None where /proc is not there."""
    kib = _status_kib("VmRSS", pid)
    return None if kib is None else kib * 1024


def peak_resident_bytes(pid: int | str = "self") -> int | None:
    """Highest resident set size the process has had (VmHWM)."""
    kib = _status_kib("VmHWM", pid)
    return None if kib is None else kib * 1024


# Resident bytes a hot session costs per byte of its tensors (what its nbytes() and the cache
# count). Measured: 300 fast sessions of 1,200-character PEP windows, built one after another in
# one process, held 552 MiB of tensors (their storages sum to exactly nbytes) and grew RSS by
# 815 MiB (1.48x), after malloc_trim too: the build's temporaries, freed between the sessions'
# blocks, leave holes in the heap that are neither whole pages nor reusable by everything. A
# worker given 3 GiB exceeded it by 66 MiB with 2,000 such documents when sessions were sized
# by their tensors alone (benchmarks/memory-many-2000-fast-trim.json).
HEAP_OVERHEAD = 1.5


class MemoryBudgetTooSmall(ValueError):
    """The configured budget does not leave the sessions room for one chunk."""


def sessions_budget(memory_budget: int, baseline: int, reserve: int, cache_cap: int,
                    minimum: int) -> int:
    """Bytes of tensors the hot sessions may hold: what the budget leaves over the measured
    baseline and the reserve, over HEAP_OVERHEAD (what they cost resident), never more than
    `cache_cap` (session_cache_bytes). Raises when the budget leaves less than `minimum` (one
    full chunk): it is too small for this model."""
    room = int((memory_budget - baseline - reserve) / HEAP_OVERHEAD)
    if room < minimum:
        raise MemoryBudgetTooSmall(
            f"memory budget {memory_budget:,} B leaves {room:,} B of tensors for document "
            f"sessions after the model and runtime ({baseline:,} B measured at start), the "
            f"reserve ({reserve:,} B) and the heap's overhead (x{HEAP_OVERHEAD}); at least "
            f"{minimum:,} B are needed: raise "
            f"INCSTREAM_MEMORY_BUDGET_BYTES or lower INCSTREAM_MEMORY_RESERVE_BYTES")
    return min(cache_cap, room)


@dataclass(frozen=True)
class SessionSizer:
    """Bytes of a session before it is built: rows x the engine mode's bytes per row."""

    bytes_per_row: int
    rows_bound: Callable[[int], int]  # engine.incremental.chunks.max_rows for the policy

    def estimate(self, tokens: int) -> int:
        return self.rows_bound(tokens) * self.bytes_per_row

    def max_tokens_within(self, budget: int) -> int:
        """The most tokens whose estimated session fits `budget` bytes."""
        lo, hi = 0, max(1, budget // self.bytes_per_row)
        while lo < hi:  # estimate() is monotone in tokens
            mid = (lo + hi + 1) // 2
            if self.estimate(mid) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return lo


def bytes_per_row(nbytes: int, rows: int) -> int:
    """Bytes a row costs, from a session that was built (rounded up)."""
    return math.ceil(nbytes / max(1, rows))
