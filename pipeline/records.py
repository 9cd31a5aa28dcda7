"""The records the worker publishes: doc-class/v1 updates and dead letters."""

from __future__ import annotations

import json
import time
from typing import Any

from state.ordering import AppliedRevision

CLASS_SCHEMA = "doc-class/v1"
DLQ_SCHEMA = "doc-edit-dlq/v1"


def update_record(
    doc_id: str,
    revision: AppliedRevision,
    length_tokens: int,
    sha1: str,
    latency_s: float,
) -> dict[str, Any]:
    """doc-class/v1 for one applied revision. The label fields are filled once a model runs."""
    return {
        "schema": CLASS_SCHEMA,
        "doc_id": doc_id,
        "rev": revision.rev,
        "snapshot": revision.is_snapshot,
        "length_chars": len(revision.text),
        "length_tokens": length_tokens,
        "sha1": sha1,
        "change": {
            "start": revision.change.start,
            "deleted": revision.change.deleted,
            "inserted": revision.change.inserted,
        },
        "label": None,
        "scores": None,
        "label_changed": False,
        "model": None,
        "cost": {"latency_s": round(latency_s, 6)},
        "ts_event": revision.ts,
        "ts": time.time(),
    }


def dead_letter_record(
    reason: str, message: str, raw: bytes | str | dict[str, Any] | None
) -> dict[str, Any]:
    """What goes to the DLQ: the reason, a human message, and the event as it came in."""
    if isinstance(raw, bytes):
        original: Any = raw.decode("utf-8", errors="replace")
    else:
        original = raw
    return {
        "schema": DLQ_SCHEMA,
        "reason": reason,
        "error": message,
        "event": original,
        "ts": time.time(),
    }


def to_bytes(record: dict[str, Any]) -> bytes:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
