"""Character edits -> token edits, re-tokenizing only a window around the change.

The BERT tokenizer (uncased WordPiece after a pre-tokenizer that splits on whitespace and
punctuation) maps each whitespace-separated word independently, so tokens never cross a
whitespace character and the tokens of a word depend only on that word. Hence: widen the
changed character span to whitespace boundaries lying outside the change (plus one old token on
each side, for safety), re-tokenize that window of the new text and splice it in. Only ' ',
'\\t', '\\n' and '\\r' count as boundaries: every normalizer treats them as whitespace, while
e.g. control characters are deleted by BERT's normalizer and would glue their neighbours.

The result must equal tokenizing the whole new text; tests check that with random and real
edits. After splicing, the common prefix and suffix of old and new window tokens are trimmed, so
the token edit handed to the model is minimal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from incstream.engine.incremental.text_ops import TextChange

BOUNDARY = frozenset(" \t\n\r")


@dataclass(frozen=True)
class TokenEdit:
    """tokens[start:start+deleted] were replaced by `inserted` (ids)."""

    start: int
    deleted: int
    inserted: tuple[int, ...]

    @property
    def is_noop(self) -> bool:
        return self.deleted == 0 and not self.inserted


class TokenizedText:
    """A text's WordPiece ids (no special tokens) and their character spans.

    The spans live in numpy arrays: after an edit every later span moves by the same amount,
    which is one vectorised add instead of a Python loop over the document.
    """

    def __init__(self, text: str, ids: Sequence[int] = (), starts: Sequence[int] = (),
                 ends: Sequence[int] = ()):
        self.text = text
        self.ids: list[int] = list(ids)
        self.start_arr = np.asarray(starts, dtype=np.int64)
        self.end_arr = np.asarray(ends, dtype=np.int64)

    @property
    def starts(self) -> list[int]:
        return self.start_arr.tolist()

    @property
    def ends(self) -> list[int]:
        return self.end_arr.tolist()


def tokenize(tokenizer, text: str, offset: int = 0) -> TokenizedText:
    # A fast tokenizer's Rust backend directly where it is set up as the call below leaves it
    # (no truncation, no padding): the same ids and offsets, without the wrapper's ~40 us of
    # Python that every edit would pay.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        enc = backend.encode(text, add_special_tokens=False)
        ids, offsets = enc.ids, enc.offsets
    else:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                        verbose=False)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
    spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2) + offset
    return TokenizedText(text, ids, spans[:, 0], spans[:, 1])


def _left_boundary(text: str, pos: int) -> int:
    """Largest b <= pos with b == 0 or text[b-1] a boundary character."""
    while pos > 0 and text[pos - 1] not in BOUNDARY:
        pos -= 1
    return pos


def _right_boundary(text: str, pos: int) -> int:
    """Smallest b >= pos with b == len(text) or text[b] a boundary character."""
    while pos < len(text) and text[pos] not in BOUNDARY:
        pos += 1
    return pos


def apply_text_change(tokenizer, old: TokenizedText, new_text: str,
                      change: TextChange) -> tuple[TokenizedText, TokenEdit]:
    """Tokens of `new_text` from those of `old` plus the change; and the minimal token edit.

    `old` is updated in place (and returned) so long documents do not copy their token lists.
    """
    if change.is_noop:
        old.text = new_text
        return old, TokenEdit(len(old.ids), 0, ())
    text = old.text
    a, b = change.start, change.start + change.deleted  # changed span in old text
    # One old token of slack on each side, then out to whitespace boundaries.
    starts, ends = old.start_arr, old.end_arr
    i = int(np.searchsorted(ends, a + 1))  # first token ending after a
    a2 = int(starts[i - 1]) if i > 0 else 0
    j = int(np.searchsorted(starts, b))  # first token starting at/after b
    b2 = int(ends[j]) if j < len(old.ids) else len(text)
    wa = _left_boundary(text, min(a, a2))
    wb = _right_boundary(text, max(b, b2))
    # Old tokens inside [wa, wb): none crosses a boundary, so the window cuts cleanly.
    ti = int(np.searchsorted(starts, wa))
    tj = int(np.searchsorted(starts, wb))
    delta = change.inserted - change.deleted
    piece = tokenize(tokenizer, new_text[wa : wb + delta], offset=wa)
    old_ids = old.ids[ti:tj]
    # Trim the common prefix/suffix so the edit is minimal.
    p = 0
    while p < min(len(old_ids), len(piece.ids)) and old_ids[p] == piece.ids[p]:
        p += 1
    s = 0
    while (s < min(len(old_ids), len(piece.ids)) - p
           and old_ids[-1 - s] == piece.ids[-1 - s]):
        s += 1
    old.ids[ti:tj] = piece.ids
    old.start_arr = np.concatenate([starts[:ti], piece.start_arr, starts[tj:] + delta])
    old.end_arr = np.concatenate([ends[:ti], piece.end_arr, ends[tj:] + delta])
    old.text = new_text
    edit = TokenEdit(ti + p, len(old_ids) - p - s, tuple(piece.ids[p : len(piece.ids) - s]))
    return old, edit


def token_count_delta(tokenizer, old_text: str, new_text: str, change: TextChange) -> int:
    """How many tokens `change` adds (negative: removes), without tokenizing the whole text.

    For callers that only need the count (the text-only worker): tokenizes the changed span
    widened to boundary characters, once in the old text and once in the new one. Exact for
    the same reason as `apply_text_change`: no token crosses a boundary character.
    """
    if change.is_noop:
        return 0
    wa = _left_boundary(old_text, change.start)
    wb = _right_boundary(old_text, change.start + change.deleted)
    delta = change.inserted - change.deleted

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    return count(new_text[wa : wb + delta]) - count(old_text[wa:wb])
