"""Stable position ids: an edit does not renumber the tokens around it.

With absolute position embeddings, canonical ids (0..n-1) make one inserted token shift every
later token, so every later row of layer 0 would change. Instead inserted tokens take free ids
between their neighbours (gaps left by deletions) and, when there is no gap, duplicate the id
just before the right neighbour; deletions leave gaps. The chunk is re-based to canonical ids
(a full recompute of that chunk) only when duplicates pile up past a limit, or when it is
rebuilt anyway (split/merge). What this costs in fidelity is measured against canonical ids by
the benchmark (`stable_vs_canonical`).
"""

from __future__ import annotations


def insert_positions(left: int, right: int, count: int) -> list[int]:
    """Ids for `count` tokens inserted between neighbours with ids `left` and `right`."""
    free = right - left - 1
    if free <= 0:
        return [left] * count
    return [left + 1 + min(t, free - 1) for t in range(count)]


def duplicates(position_ids: list[int]) -> int:
    """How many rows share an id with an earlier row."""
    return len(position_ids) - len(set(position_ids))


def canonical(n: int) -> list[int]:
    return list(range(n))
