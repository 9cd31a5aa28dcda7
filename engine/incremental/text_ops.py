"""Character-level edit ops of doc-edit/v1, applied to text.

An op list walks the old text from the start: ``{"retain": n}`` keeps n code points,
``{"delete": n}`` drops n, ``{"insert": "s"}`` adds s. Whatever the list does not reach is kept
(as in OT-style deltas). Positions are Unicode code points, which is what a Python ``str``
indexes, so no re-encoding is needed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


class InvalidOps(ValueError):
    """The ops cannot be applied to this text. `reason`: "invalid_ops" or "ops_past_end"."""

    def __init__(self, message: str, reason: str = "invalid_ops") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class TextChange:
    """What an op list did, as one span: old[start:start+deleted] became `inserted`.

    Several ops collapse into their enclosing span; that is what incremental inference needs
    (which region to re-tokenize), not the individual ops.
    """

    start: int
    deleted: int
    inserted: int

    @property
    def is_noop(self) -> bool:
        return self.deleted == 0 and self.inserted == 0


def apply_ops(text: str, ops: Sequence[Any]) -> tuple[str, TextChange]:
    """Apply `ops` to `text`; return the new text and the span that changed.

    Raises InvalidOps for anything malformed: unknown op, negative or non-integer counts,
    a retain or delete past the end of the text.
    """
    if not isinstance(ops, Sequence) or isinstance(ops, str | bytes):
        raise InvalidOps("ops must be a list")
    pieces: list[str] = []
    cursor = 0  # position in the old text
    first_change: int | None = None  # old-text position where the first change happens
    last_change_old = 0  # old-text position just after the last change
    last_change_new = 0  # new-text position just after the last change
    new_len = 0
    for index, op in enumerate(ops):
        if not isinstance(op, dict) or len(op) != 1:
            raise InvalidOps(f"op #{index} must be an object with exactly one key: {op!r}")
        (kind, value), = op.items()
        if kind == "insert":
            if not isinstance(value, str):
                raise InvalidOps(f"op #{index}: insert takes a string")
            if not value:
                continue
            if first_change is None:
                first_change = cursor
            pieces.append(value)
            new_len += len(value)
            last_change_old, last_change_new = cursor, new_len
            continue
        if kind not in ("retain", "delete"):
            raise InvalidOps(f"op #{index}: unknown op {kind!r}")
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InvalidOps(f"op #{index}: {kind} takes a non-negative integer, got {value!r}")
        if cursor + value > len(text):
            raise InvalidOps(
                f"op #{index}: {kind} {value} at position {cursor} runs past the end of the "
                f"text ({len(text)} code points)",
                reason="ops_past_end",
            )
        if kind == "retain":
            pieces.append(text[cursor : cursor + value])
            new_len += value
        elif value:
            if first_change is None:
                first_change = cursor
            last_change_old, last_change_new = cursor + value, new_len
        cursor += value
    pieces.append(text[cursor:])
    new_text = "".join(pieces)
    if first_change is None:
        return new_text, TextChange(start=len(text), deleted=0, inserted=0)
    deleted = last_change_old - first_change
    inserted = last_change_new - first_change
    return new_text, TextChange(start=first_change, deleted=deleted, inserted=inserted)


def sha1_hex(text: str) -> str:
    """SHA-1 of the UTF-8 text, as doc-edit/v1's ``sha1_after`` carries it."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()
