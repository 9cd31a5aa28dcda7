"""Sizing sessions before they are built, and the sessions' share of the memory budget."""

from __future__ import annotations

from functools import partial

import pytest

from incstream.engine.incremental.chunks import ChunkPolicy, chunk_lengths, max_rows
from incstream.pipeline.broker_watch import BrokerWatch
from incstream.pipeline.memory_budget import (
    HEAP_OVERHEAD,
    MemoryBudgetTooSmall,
    SessionSizer,
    peak_resident_bytes,
    resident_bytes,
    sessions_budget,
)


def test_max_rows_bounds_every_layout_of_the_chunker():
    policy = ChunkPolicy()
    for n in (0, 1, 200, 254, 255, 1000, 5000):
        for ids in ([7] * n, list(range(1000, 1000 + n))):  # no cut candidates / many
            lengths = chunk_lengths(ids, policy)
            assert sum(lengths) + 2 * len(lengths) <= max_rows(n, policy), n


def test_sizer_inverts_its_estimate():
    sizer = SessionSizer(bytes_per_row=1000, rows_bound=partial(max_rows, policy=ChunkPolicy()))
    tokens = sizer.max_tokens_within(5_000_000)
    assert sizer.estimate(tokens) <= 5_000_000 < sizer.estimate(tokens + 1)


def test_sessions_get_what_the_budget_leaves_at_most_the_cache_cap():
    # 1500 bytes of room hold 1000 bytes of session tensors (HEAP_OVERHEAD)
    assert sessions_budget(3000, baseline=1000, reserve=500, cache_cap=10_000,
                           minimum=100) == 1500 / HEAP_OVERHEAD == 1000
    assert sessions_budget(3000, baseline=1000, reserve=500, cache_cap=800, minimum=100) == 800
    assert sessions_budget(3000, baseline=1000, reserve=500, cache_cap=50, minimum=100) == 50
    with pytest.raises(MemoryBudgetTooSmall, match="INCSTREAM_MEMORY_BUDGET_BYTES"):
        sessions_budget(1640, baseline=1000, reserve=500, cache_cap=800, minimum=100)


def test_resident_memory_is_read_from_proc():
    rss, peak = resident_bytes(), peak_resident_bytes()
    assert rss is not None and peak is not None and 0 < rss <= peak


def test_broker_watch_counts_from_the_first_failed_probe_and_resets_on_success():
    now = [100.0]
    watch = BrokerWatch(exit_after_s=30, clock=lambda: now[0])
    watch.observe(None)
    assert watch.healthy and watch.seconds_unusable() == 0 and not watch.should_exit()
    watch.observe("broker lacks this worker's topics")
    now[0] = 120.0
    watch.observe("broker does not answer")
    assert not watch.healthy and watch.seconds_unusable() == 20 and not watch.should_exit()
    now[0] = 130.0
    assert watch.should_exit() and watch.problem == "broker does not answer"
    watch.observe(None)
    assert watch.healthy and not watch.should_exit()
    never = BrokerWatch(exit_after_s=0, clock=lambda: now[0])
    never.observe("broker does not answer")
    now[0] = 10_000.0
    assert never.seconds_unusable() > 0 and not never.should_exit()  # 0: never exit


FRAGMENTED_HEAP = """
import sys
from incstream.pipeline.memory_budget import resident_bytes, return_freed_memory
big = bytearray(16 << 20); del big  # glibc raises its mmap threshold: 1 MB blocks now use the heap
blocks = [bytearray(1 << 20) for _ in range(200)]
del blocks[::2]  # 100 MB free in the middle of the heap, nothing at its top to trim
before = resident_bytes()
returned = return_freed_memory()
print(returned, before - resident_bytes())
"""


def test_freed_heap_pages_go_back_to_the_system():
    """What the session cache relies on after an eviction: pages glibc kept in its heap
    (freed blocks between live ones) are returned, not held until the process exits."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", FRAGMENTED_HEAP], capture_output=True,
                         text=True, check=True).stdout.split()
    assert out[0] == "True"
    assert int(out[1]) > 80 << 20, f"only {int(out[1]) >> 20} MiB returned"
