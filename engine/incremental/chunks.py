"""Content-defined chunking: where a long document is cut into attention windows.

A document's tokens are cut into chunks ([CLS] content [SEP], at most `max_tokens` rows), and
each chunk is run with canonical position ids 0..n-1. The cut points are a function of the
token ids alone (like rsync / FastCDC chunking of byte streams): a cut may fall before token c
when a hash of the three tokens ending at c hits 0 modulo `cut_every`, c does not continue a
word ("##" piece), and the chunk so far has at least `min_content` tokens; a chunk that would
pass `max_content` tokens without such a cut is cut where that hash is lowest in its range.

Why this matters:
- Exact agreement with a full re-run. The layout after any edit history is the layout a fresh
  build of the final text gets, and a chunk's activations depend only on its token ids. So an
  incrementally maintained document and one built from scratch give the same chunks, the same
  codes and the same answer; a worker can drop its cache and rebuild from the text at any time.
- Locality. An edit moves only the cuts near it: cut candidates are defined by local content,
  so the cuts after the edit fall on the same tokens as before (the scan re-synchronises at the
  first candidate at least `min_content` past the edited chunk). An edit's cost does not depend
  on the document's length.
The choice of cut points costs one vectorised hash over the token ids per edit (about 1 ms for
50k tokens), negligible next to the transformer.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

_PRIME = 2_147_483_647  # 2^31 - 1; the hash is a random linear form modulo this prime
_MIX = (1_103_515_245, 12_345_677, 2_654_435_761 % _PRIME)


@dataclass(frozen=True)
class ChunkPolicy:
    max_tokens: int = 256  # rows per chunk including [CLS] and [SEP]; MiniLM allows 512
    min_fraction: float = 0.25  # no content-defined cut before this fraction of the maximum
    # Mean spacing of cut candidates in tokens; default 3/8 of the maximum content (95 for 256
    # rows): most chunks end on a content-defined cut (~86%), averaging ~150 tokens.
    cut_every: int | None = None

    def __post_init__(self) -> None:
        if not 4 <= self.max_tokens <= 512:
            raise ValueError("max_tokens must be in [4, 512]")
        if self.cut_every is not None and self.cut_every < 1:
            raise ValueError("cut_every must be >= 1")

    @property
    def cut_spacing(self) -> int:
        return self.cut_every or max(1, self.max_content * 3 // 8)

    @property
    def max_content(self) -> int:
        return self.max_tokens - 2

    @property
    def min_content(self) -> int:
        return max(1, int(self.max_content * self.min_fraction))


def cut_scores(ids: Sequence[int], continues_word: torch.Tensor | None = None) -> torch.Tensor:
    """(n,) int64: a hash of the three tokens ending at each index c, i.e. of the window just
    before a cut at c. Cuts inside a word and at c = 0 get the worst score (_PRIME)."""
    t = torch.as_tensor(ids, dtype=torch.long)
    padded = torch.cat([torch.zeros(2, dtype=torch.long), t])  # window (c-2, c-1, c)
    h = (padded[:-2] * _MIX[0] + padded[1:-1] * _MIX[1] + padded[2:] * _MIX[2]) % _PRIME
    h = (h * 48_271) % _PRIME  # one more multiplicative step decorrelates the low bits
    if continues_word is not None and len(t):
        h[continues_word[t]] = _PRIME
    if len(h):
        h[0] = _PRIME
    return h


def cut_candidates(ids: Sequence[int], cut_every: int,
                   continues_word: torch.Tensor | None = None) -> list[int]:
    """Token indices c (1 <= c < n) before which a content-defined cut may fall, ascending."""
    return _candidates(cut_scores(ids, continues_word), cut_every)


def _candidates(scores: torch.Tensor, cut_every: int) -> list[int]:
    return torch.nonzero((scores % cut_every == 0) & (scores < _PRIME)).flatten().tolist()


def _next_cut(scores: torch.Tensor, candidates: list[int], start: int, base: int,
              policy: ChunkPolicy) -> int:
    """Where the chunk starting at token `start` ends: the first candidate in its allowed
    range, else the first lowest score there. `scores`/`candidates` cover tokens from `base`
    on (candidates as absolute indices)."""
    lo, hi = start + policy.min_content, start + policy.max_content
    i = bisect.bisect_left(candidates, lo)
    if i < len(candidates) and candidates[i] <= hi:
        return candidates[i]
    return lo + int(torch.argmin(scores[lo - base : hi + 1 - base]))  # first lowest score


def chunk_lengths(ids: Sequence[int], policy: ChunkPolicy,
                  continues_word: torch.Tensor | None = None) -> list[int]:
    """Content lengths of the chunks of a document (never empty: [0] for no tokens).

    When no candidate falls in a chunk's allowed range, the cut goes where the score is lowest
    in that range: still a function of local content, so even text that repeats without any
    candidate (tables, generated text) re-synchronises after an edit.
    """
    n = len(ids)
    if n <= policy.max_content:
        return [n]
    scores = cut_scores(ids, continues_word)
    candidates = _candidates(scores, policy.cut_spacing)
    lengths: list[int] = []
    start = 0
    while n - start > policy.max_content:
        cut = _next_cut(scores, candidates, start, 0, policy)
        lengths.append(cut - start)
        start = cut
    lengths.append(n - start)
    return lengths


def max_rows(n_tokens: int, policy: ChunkPolicy) -> int:
    """An upper bound on the rows (content + [CLS] and [SEP] per chunk) of a document of
    `n_tokens` tokens, without cutting it: every chunk but the last holds at least
    `policy.min_content` tokens (chunk_lengths cuts in [min, max]). For budgeting a session's
    memory before building it."""
    return n_tokens + 2 * (n_tokens // policy.min_content + 1)


def window_scores(ids: Sequence[int], lo: int, hi: int,
                  continues_word: torch.Tensor | None = None) -> torch.Tensor:
    """cut_scores(ids)[lo:hi], computed from ids[lo-2:hi] only."""
    base = max(0, lo - 2)
    return cut_scores(ids[base:hi], continues_word)[lo - base :]


def relayout(ids: Sequence[int], old_lengths: Sequence[int], edit_start: int, deleted: int,
             inserted: int, policy: ChunkPolicy,
             continues_word: torch.Tensor | None = None) -> tuple[int, int, list[int]]:
    """The chunk layout of the edited tokens, re-cut only around the edit.

    `ids` are the tokens after replacing old tokens [edit_start, edit_start+deleted) by
    `inserted` new ones; `old_lengths` is the layout before. Returns (first, replaced, lengths):
    old chunks first..first+replaced-1 become chunks of these content lengths, every other
    chunk is unchanged. Equals chunk_lengths(ids) (tested): a chunk's cut reads scores in
    [start+min, start+max] only, so cuts whose range ends before the edit stand, and the scan
    stops at the first new cut that is an old cut (shifted) with unchanged tokens from two
    before it on, from where every later decision is the old one.
    """
    n = len(ids)
    if n <= policy.max_content or len(old_lengths) == 1:
        return 0, len(old_lengths), chunk_lengths(ids, policy, continues_word)
    old_starts = offsets(list(old_lengths))
    delta = inserted - deleted
    # First chunk whose decision range reaches the edit: the cuts before it stand.
    first = bisect.bisect_left([s + policy.max_content for s in old_starts], edit_start)
    first = min(first, len(old_lengths) - 1)
    stable_from = edit_start + inserted + 2  # new index from which cut scores are unchanged
    old_cut_at = {s + delta: k for k, s in enumerate(old_starts)
                  if k > first and s + delta >= stable_from}
    base = start = old_starts[first]
    span = 4 * policy.max_content
    hi = 0
    lengths: list[int] = []
    while n - start > policy.max_content:
        if hi <= start + policy.max_content:  # score (again) far enough ahead
            hi = min(n, start + policy.max_content + span)
            scores = window_scores(ids, base, hi, continues_word)
            cands = [c + base for c in _candidates(scores, policy.cut_spacing)]
        cut = _next_cut(scores, cands, start, base, policy)
        lengths.append(cut - start)
        start = cut
        if cut in old_cut_at:  # re-synchronised with the old layout
            return first, old_cut_at[cut] - first, lengths
    lengths.append(n - start)
    return first, len(old_lengths) - first, lengths


_WORD_PIECE_MASKS: dict[int, torch.Tensor] = {}


def word_continuation_mask(tokenizer: Any) -> torch.Tensor:
    """(vocab,) bool: True for WordPiece continuations ("##ing"), where no cut may fall."""
    key = id(tokenizer)
    if key not in _WORD_PIECE_MASKS:
        vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        _WORD_PIECE_MASKS[key] = torch.tensor([tok.startswith("##") for tok in vocab])
    return _WORD_PIECE_MASKS[key]


def offsets(lengths: list[int]) -> list[int]:
    acc, out = 0, []
    for n in lengths:
        out.append(acc)
        acc += n
    return out
