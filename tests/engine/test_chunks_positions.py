"""Chunk bookkeeping and stable position ids."""

from __future__ import annotations

from engine.chunks import ChunkEdit, ChunkPolicy, locate
from engine.positions import duplicates, insert_positions


def test_locate_routes_edits_to_chunks():
    lengths = [10, 10, 10]
    assert locate(lengths, 0, 0) == [ChunkEdit(0, 0, 0)]
    assert locate(lengths, 10, 0) == [ChunkEdit(1, 0, 0)]  # boundary: chunk starting there
    assert locate(lengths, 30, 0) == [ChunkEdit(2, 10, 0)]  # end of document
    assert locate(lengths, 9, 2) == [ChunkEdit(0, 9, 1), ChunkEdit(1, 0, 1)]
    assert locate(lengths, 5, 20) == [ChunkEdit(0, 5, 5), ChunkEdit(1, 0, 10),
                                      ChunkEdit(2, 0, 5)]
    assert locate([0], 0, 0) == [ChunkEdit(0, 0, 0)]


def test_policy_split_lengths():
    pol = ChunkPolicy(max_tokens=66)  # 64 content, fill 48
    assert pol.split_lengths(0) == [0]
    assert pol.split_lengths(48) == [48]
    parts = pol.split_lengths(1000)
    assert sum(parts) == 1000 and max(parts) <= pol.fill_content and min(parts) >= 47


def test_insert_positions_fill_gaps_then_duplicate():
    assert insert_positions(4, 5, 2) == [4, 4]  # no gap: duplicate the left neighbour
    assert insert_positions(4, 8, 2) == [5, 6]  # a gap left by deletions is reused
    assert insert_positions(4, 7, 4) == [5, 6, 6, 6]
    assert duplicates([0, 1, 1, 2, 2, 2]) == 3
