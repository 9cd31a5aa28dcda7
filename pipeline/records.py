"""The records the worker publishes: doc-class/v1 updates and dead letters."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from typing import TYPE_CHECKING, Any

from incstream.state.ordering import AppliedRevision

if TYPE_CHECKING:
    from incstream.pipeline.document_sessions import Inference

CLASS_SCHEMA = "doc-class/v1"
DLQ_SCHEMA = "doc-edit-dlq/v1"
# Every reason a dead letter can give (README's table explains each; metrics can export them
# all from the start).
DEAD_LETTER_REASONS = (
    "event_too_large", "invalid_json", "unknown_schema", "invalid_event", "invalid_text",
    "key_mismatch", "invalid_ops", "ops_past_end", "base_rev_mismatch", "length_mismatch",
    "checksum_mismatch", "gap_overflow", "state_too_large", "state_unreadable",
    "awaiting_snapshot", "document_too_large", "internal_error",
)
# A dead letter always fits one Kafka record (the producer's default limit is 1 MB): past this
# size it carries an excerpt of the event, its size and its SHA-1 instead of the whole event.
DEAD_LETTER_MAX_BYTES = 256 * 1024
EVENT_EXCERPT_CHARS = 2048
ERROR_MAX_CHARS = 2048  # error messages quote parts of the event (a key, a schema name)
KEY_MAX_BYTES = 1024  # a dead letter's Kafka key; longer ones are replaced by their SHA-1


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
    (when its gap filled) is given as it was held: its text as it arrived.

    A record that would be over DEAD_LETTER_MAX_BYTES carries instead the event's first
    EVENT_EXCERPT_CHARS characters in `event`, `event_truncated: true`, `event_bytes` (its
    size) and `event_sha1` (of its bytes), so it still fits the topic."""
    if len(message) > ERROR_MAX_CHARS:
        message = message[:ERROR_MAX_CHARS] + f"... ({len(message)} characters)"
    extra: dict[str, Any] = {}
    if isinstance(raw, bytes):
        try:
            original: Any = raw.decode("utf-8")
        except UnicodeDecodeError:
            original = raw.decode("utf-8", errors="replace")
            extra["event_base64"] = base64.b64encode(raw).decode("ascii")
    else:
        original = raw
    record = {"schema": DLQ_SCHEMA, "reason": reason, "error": message, "event": original,
              **extra, "ts": time.time()}
    small = not isinstance(raw, bytes | str) or len(raw) <= DEAD_LETTER_MAX_BYTES
    if small and len(to_bytes(record)) <= DEAD_LETTER_MAX_BYTES:
        return record
    if isinstance(raw, bytes):
        whole = raw
    elif isinstance(raw, str):  # a held event's text as it arrived
        whole = raw.encode("utf-8", errors="surrogatepass")
    else:  # a held event kept as JSON by an older worker
        whole = to_bytes(raw)
    # Decode only the head (4 bytes per character at most; a character cut at the end of it
    # shows as U+FFFD, past the excerpt's end anyway unless the head is all 4-byte ones).
    text = whole[:4 * EVENT_EXCERPT_CHARS].decode("utf-8", errors="replace")
    return {"schema": DLQ_SCHEMA, "reason": reason, "error": message,
            "event": text[:EVENT_EXCERPT_CHARS], "event_truncated": True,
            "event_bytes": len(whole), "event_sha1": hashlib.sha1(whole).hexdigest(),
            "ts": record["ts"]}


def dead_letter_key(key: bytes | None) -> bytes | None:
    """The dead letter's Kafka key: the event's, unless it is too long to be a key."""
    if key is None or len(key) <= KEY_MAX_BYTES:
        return key
    return b"sha1:" + hashlib.sha1(key).hexdigest().encode("ascii")


def to_bytes(record: Any) -> bytes:
    try:
        return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (an old held event): JSON's \\u escape
        return json.dumps(record, separators=(",", ":")).encode("ascii")
