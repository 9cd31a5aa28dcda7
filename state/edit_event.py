"""doc-edit/v1: one edit (or snapshot) of one document, parsed from its JSON bytes.

Whatever arrives is either an EditEvent every later step can handle (text that encodes as
UTF-8, revisions an int64 consumer can read, a finite timestamp, a doc_id short enough to be
a Kafka key) or an EventRejected with a stable reason: hostile input never reaches the
ordering, the codec or the model as something they would raise on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

SCHEMA = "doc-edit/v1"
INT64_MAX = 2**63 - 1  # revisions and lengths must be readable by int64 consumers
MAX_DOC_ID_BYTES = 1024  # a doc_id is the Kafka key of the event, its updates and its state


class EventRejected(ValueError):
    """An event that can never be applied. `reason` is a short stable label for metrics/DLQ."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class EditEvent:
    doc_id: str
    rev: int
    ops: list[dict[str, Any]] | None = None  # an edit ...
    snapshot: str | None = None  # ... or the full text (create / resync)
    base_rev: int | None = None
    len_after: int | None = None
    sha1_after: str | None = None
    ts: float | None = None

    @property
    def is_snapshot(self) -> bool:
        return self.snapshot is not None

    def to_json(self) -> dict[str, Any]:
        """The event as doc-edit/v1 JSON (used to keep held events in the durable state)."""
        out: dict[str, Any] = {"schema": SCHEMA, "doc_id": self.doc_id, "rev": self.rev}
        for name in ("ops", "snapshot", "base_rev", "len_after", "sha1_after", "ts"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


def _optional_int(payload: dict[str, Any], name: str) -> int | None:
    value = payload.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= INT64_MAX:
        raise EventRejected("invalid_event",
                            f"{name} must be an integer from 0 to 2^63-1 (int64)")
    return value


def _check_text(value: str, name: str) -> None:
    """JSON may carry lone surrogates (\\ud800) that no UTF-8 text can hold."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise EventRejected("invalid_text", f"{name} holds a lone surrogate (not UTF-8 text)"
                            ) from None


def _check_texts(doc_id: str, snapshot: Any, ops: Any) -> None:
    _check_text(doc_id, "doc_id")
    if len(doc_id.encode("utf-8")) > MAX_DOC_ID_BYTES:
        raise EventRejected("invalid_event",
                            f"doc_id is longer than {MAX_DOC_ID_BYTES} bytes of UTF-8")
    if isinstance(snapshot, str):
        _check_text(snapshot, "snapshot")
    for index, op in enumerate(ops if isinstance(ops, list) else ()):
        if isinstance(op, dict) and isinstance(op.get("insert"), str):
            _check_text(op["insert"], f"op #{index}'s insert")


def event_from_json(payload: Any) -> EditEvent:
    """Validate a decoded JSON value as doc-edit/v1."""
    if not isinstance(payload, dict):
        raise EventRejected("invalid_event", "event must be a JSON object")
    schema = payload.get("schema")
    if schema != SCHEMA:
        raise EventRejected("unknown_schema", f"unknown schema {schema!r}; expected {SCHEMA!r}")
    doc_id = payload.get("doc_id")
    if not isinstance(doc_id, str) or not doc_id:
        raise EventRejected("invalid_event", "doc_id must be a non-empty string")
    rev = _optional_int(payload, "rev")
    if rev is None:
        raise EventRejected("invalid_event", "rev is required")
    snapshot = payload.get("snapshot")
    ops = payload.get("ops")
    if (snapshot is None) == (ops is None):
        raise EventRejected("invalid_event", "an event carries exactly one of 'ops' or 'snapshot'")
    if snapshot is not None and not isinstance(snapshot, str):
        raise EventRejected("invalid_event", "snapshot must be a string")
    if ops is not None and not isinstance(ops, list):
        raise EventRejected("invalid_event", "ops must be a list")
    sha1_after = payload.get("sha1_after")
    if sha1_after is not None and not (isinstance(sha1_after, str) and len(sha1_after) == 40):
        raise EventRejected("invalid_event", "sha1_after must be 40 hex digits")
    ts = payload.get("ts")
    # `not <=` also refuses NaN and infinity (1e999), which no JSON consumer could read back.
    if ts is not None and (not isinstance(ts, int | float) or isinstance(ts, bool)
                           or not abs(ts) <= INT64_MAX):
        raise EventRejected("invalid_event", "ts must be a finite number")
    _check_texts(doc_id, snapshot, ops)
    return EditEvent(
        doc_id=doc_id,
        rev=rev,
        ops=ops,
        snapshot=snapshot,
        base_rev=_optional_int(payload, "base_rev"),
        len_after=_optional_int(payload, "len_after"),
        sha1_after=sha1_after.lower() if sha1_after else None,
        ts=ts,
    )


def parse_edit_event(raw: bytes | str | None, max_bytes: int | None = None) -> EditEvent:
    """Bytes off the wire -> EditEvent, or EventRejected saying why not. `max_bytes`: events
    larger than this are refused before they are parsed (event_too_large)."""
    if raw is None:
        raise EventRejected("invalid_json", "empty message (tombstone)")
    if max_bytes is not None and len(raw) > max_bytes:
        raise EventRejected("event_too_large",
                            f"the event is {len(raw)} bytes, over the {max_bytes}-byte limit")
    try:
        payload = json.loads(raw)
    except RecursionError:
        raise EventRejected("invalid_json", "JSON nested too deeply to parse") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, a 5000-digit integer
        raise EventRejected("invalid_json", f"not valid JSON: {exc}") from None
    return event_from_json(payload)
