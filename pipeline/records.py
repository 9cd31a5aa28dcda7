"""The records the worker publishes: doc-class/v1 updates and dead letters."""

from __future__ import annotations

import base64
import json
import time
from typing import TYPE_CHECKING, Any

from state.ordering import AppliedRevision

if TYPE_CHECKING:
    from pipeline.document_sessions import Inference

CLASS_SCHEMA = "doc-class/v1"
DLQ_SCHEMA = "doc-edit-dlq/v1"


def update_record(
    doc_id: str,
    revision: AppliedRevision,
    length_tokens: int,
    sha1: str,
    latency_s: float,
    inference: Inference | None = None,
    model: str | None = None,
    label_changed: bool = False,
) -> dict[str, Any]:
    """doc-class/v1 for one applied revision. Without a model (`inference` None) the label
    fields are null and the cost is the latency only.

    cost: latency_s (event taken off the stream -> this record built), inference_s (the
    classifier alone), positions_recomputed (rows, summed over layers), macs_incremental (what
    this revision cost), macs_dense_equivalent (the dense original model re-run on the whole
    document), cache ("hit": incremental update of a cached session; "miss": built fresh, no
    session cached or a snapshot; "rebuild": a cached session was out of step, built fresh).
    """
    cost: dict[str, Any] = {"latency_s": round(latency_s, 6)}
    if inference is not None:
        cost.update({
            "inference_s": round(inference.seconds, 6),
            "positions_recomputed": inference.positions_recomputed,
            "macs_incremental": inference.macs,
            "macs_dense_equivalent": inference.macs_dense_equivalent,
            "cache": inference.cache,
        })
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
        "label": inference.label if inference else None,
        "scores": inference.scores if inference else None,
        "label_changed": label_changed,
        "model": model if inference else None,
        "cost": cost,
        "ts_event": revision.ts,
        "ts": time.time(),
    }


def dead_letter_record(
    reason: str, message: str, raw: bytes | str | dict[str, Any] | None
) -> dict[str, Any]:
    """What goes to the DLQ: the reason, a human message, and the event as it came in.

    `event` is the message's bytes as text, exactly (never the event re-serialized after
    parsing). Bytes that are not UTF-8 are also given exactly, base64, in `event_base64`
    (`event` then has U+FFFD where they did not decode). A held event dead-lettered later
    (when its gap filled) is given as it was held: its text as it arrived."""
    extra: dict[str, Any] = {}
    if isinstance(raw, bytes):
        try:
            original: Any = raw.decode("utf-8")
        except UnicodeDecodeError:
            original = raw.decode("utf-8", errors="replace")
            extra["event_base64"] = base64.b64encode(raw).decode("ascii")
    else:
        original = raw
    return {
        "schema": DLQ_SCHEMA,
        "reason": reason,
        "error": message,
        "event": original,
        **extra,
        "ts": time.time(),
    }


def to_bytes(record: dict[str, Any]) -> bytes:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
