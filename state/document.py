"""The durable state of one document and its versioned byte codec.

This is what cannot be recomputed: the text, the last applied revision, and the events held
while waiting for a gap to fill (plus the last published label, so label_changed survives a
restart). Activations are never here: they are a cache (pipeline.document_sessions).
It lives in the Faust table (RocksDB locally, changelogged to Kafka), so one record is written
per applied edit: the codec compresses it (zlib) to keep a changelog record far under Kafka's
1 MB default for ordinary documents.

Wire format: b"ISD" + one byte codec version + zlib(JSON). A value of an unknown version is
refused loudly (StateCodecError), never misread.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field, replace
from typing import Any

MAGIC = b"ISD"
CODEC_VERSION = 1
NO_REVISION = -1  # `rev` of a document nothing has been applied to yet


class StateCodecError(ValueError):
    """Stored bytes that are not a document state this code can read."""


@dataclass(frozen=True)
class DocumentState:
    doc_id: str
    rev: int = NO_REVISION
    text: str = ""
    # Events that arrived ahead of a gap, by revision: the event's text as it arrived (a str;
    # values written before that hold its doc-edit/v1 JSON object, and still decode).
    held: dict[int, str | dict[str, Any]] = field(default_factory=dict)
    # Set when a gap could not be held (bound exceeded): only a snapshot can resync now.
    needs_snapshot: bool = False
    model_id: str | None = None
    # WordPiece tokens in `text` (no special tokens), kept so an edit can update the count
    # from a window around it instead of re-tokenizing the document. None: not known yet.
    tokens: int | None = None
    # The label published for `rev` by model `model_id` (None: no model ran), so the next
    # revision can say whether its label changed, also after a restart. Added after codec
    # version 1 shipped: values written without it decode with None (the codec stays v1).
    label: str | None = None

    @property
    def exists(self) -> bool:
        return self.rev != NO_REVISION

    def evolve(self, **changes: Any) -> DocumentState:
        return replace(self, **changes)


def encode_state(state: DocumentState) -> bytes:
    body = {
        "doc_id": state.doc_id,
        "rev": state.rev,
        "text": state.text,
        "held": {str(rev): event for rev, event in sorted(state.held.items())},
        "needs_snapshot": state.needs_snapshot,
        "model_id": state.model_id,
        "tokens": state.tokens,
        "label": state.label,
    }
    raw = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return MAGIC + bytes([CODEC_VERSION]) + zlib.compress(raw, level=6)


def decode_state(data: bytes) -> DocumentState:
    if len(data) < 4 or data[:3] != MAGIC:
        raise StateCodecError("not an incstream document state (bad magic)")
    version = data[3]
    if version != CODEC_VERSION:
        raise StateCodecError(
            f"document state codec version {version}; this build reads {CODEC_VERSION}"
        )
    try:
        body = json.loads(zlib.decompress(data[4:]))
    except (zlib.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StateCodecError(f"corrupt document state: {exc}") from None
    return DocumentState(
        doc_id=body["doc_id"],
        rev=int(body["rev"]),
        text=body["text"],
        held={int(rev): event for rev, event in body.get("held", {}).items()},
        needs_snapshot=bool(body.get("needs_snapshot", False)),
        model_id=body.get("model_id"),
        tokens=body.get("tokens"),
        label=body.get("label"),
    )
