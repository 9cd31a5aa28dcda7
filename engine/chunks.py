"""Stable chunking of long documents, like B-tree leaves.

A document's tokens are cut into chunks ([CLS] content [SEP], at most `max_tokens` rows in all).
Boundaries move only when needed: a chunk that grows past the maximum is split in two, one that
shrinks below the minimum is merged with its smaller neighbour (and split again evenly if the
merge is too big). So an edit touches the chunk(s) it falls in and its cost does not depend on
the document's length. New chunks are filled to 3/4 of the maximum to leave room for growth.
This module is pure bookkeeping on chunk lengths; engine.session applies it to activations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ChunkPolicy:
    max_tokens: int = 256  # rows per chunk including [CLS] and [SEP]; MiniLM allows 512
    fill: float = 0.75  # content fill of freshly built chunks
    min_fraction: float = 0.25  # merge below this fraction of the maximum content
    rebase_duplicates: int = 32  # re-base positions to canonical past this many duplicate ids

    def __post_init__(self) -> None:
        if not 4 <= self.max_tokens <= 512:
            raise ValueError("max_tokens must be in [4, 512]")

    @property
    def max_content(self) -> int:
        return self.max_tokens - 2

    @property
    def min_content(self) -> int:
        return max(1, int(self.max_content * self.min_fraction))

    @property
    def fill_content(self) -> int:
        return max(1, int(self.max_content * self.fill))

    def split_lengths(self, n: int) -> list[int]:
        """Lengths of fresh chunks for n content tokens: equal sizes near the fill target."""
        if n == 0:
            return [0]
        parts = math.ceil(n / self.fill_content)
        base, extra = divmod(n, parts)
        return [base + (1 if i < extra else 0) for i in range(parts)]


@dataclass(frozen=True)
class ChunkEdit:
    """Chunk `index` loses content[start:start+deleted]; the first piece also gets the insert."""

    index: int
    start: int
    deleted: int


def locate(lengths: list[int], start: int, deleted: int) -> list[ChunkEdit]:
    """Split a document-level token edit into per-chunk edits (first piece takes the insert).

    An insertion exactly on a boundary goes to the chunk that starts there (or the last chunk at
    the end of the document).
    """
    out: list[ChunkEdit] = []
    offset = 0
    end = start + deleted
    for idx, n in enumerate(lengths):
        lo, hi = offset, offset + n
        last = idx == len(lengths) - 1
        if not out and (lo <= start < hi or (last and start >= lo)):
            out.append(ChunkEdit(idx, start - lo, min(end, hi) - start))
        elif out and lo < end:
            out.append(ChunkEdit(idx, 0, min(end, hi) - lo))
        offset = hi
        if offset >= end and out:
            break
    return out


def offsets(lengths: list[int]) -> list[int]:
    acc, out = 0, []
    for n in lengths:
        out.append(acc)
        acc += n
    return out
