"""The durable state of one document and its versioned byte codec.

This is what cannot be recomputed: the text, the last applied revision, and the events held
while waiting for a gap to fill (plus the last published label, so label_changed survives a
restart). Activations are never here: they are a cache (pipeline.document_sessions).
It lives in the Faust table (RocksDB locally, changelogged to Kafka), so one record is written
per applied edit: the codec compresses it (zlib) to keep a changelog record far under Kafka's
1 MB default for ordinary documents.

Wire format: b"ISD" + one byte codec version + zlib(JSON). A value of an unknown version is
refused loudly (StateCodecError), never misread; so is one that inflates past
MAX_DECODED_BYTES (a zlib bomb in the changelog is never inflated whole) or lacks a field.
The caller then replaces it with `awaiting_snapshot(doc_id)`: the document heals at its next
snapshot instead of failing every later event.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field, replace
from typing import Any

MAGIC = b"ISD"
CODEC_VERSION = 1
NO_REVISION = -1  # `rev` of a document nothing has been applied to yet
# The JSON of one state never inflates past this: a state is at most max_state_bytes
# compressed (900 KB by default), and text compresses ~3-10x; 64 MiB leaves room for both.
MAX_DECODED_BYTES = 64 * 1024**2


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

    @property
    def awaits_snapshot(self) -> bool:
        """Text and revision are unknown (its stored state was unreadable): only a snapshot
        can bring this document back; an edit has nothing to apply to."""
        return self.needs_snapshot and not self.exists

    def evolve(self, **changes: Any) -> DocumentState:
        return replace(self, **changes)


def awaiting_snapshot(doc_id: str) -> DocumentState:
    """What replaces a stored state that cannot be read: no text, no revision, marked for
    resync. Any snapshot (every rev is > NO_REVISION) restores the document."""
    return DocumentState(doc_id=doc_id, needs_snapshot=True)


class StateTooLarge(ValueError):
    """A state whose JSON would inflate past MAX_DECODED_BYTES: it could never be read back."""

    def __init__(self, size: int) -> None:
        super().__init__(f"the document state's JSON would be {size} bytes, over the "
                         f"{MAX_DECODED_BYTES}-byte bound a stored state may inflate to")
        self.size = size


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
    if len(raw) > MAX_DECODED_BYTES:
        raise StateTooLarge(len(raw))
    return MAGIC + bytes([CODEC_VERSION]) + zlib.compress(raw, level=6)


def decode_state(data: bytes, max_decoded_bytes: int = MAX_DECODED_BYTES) -> DocumentState:
    """Bytes from the table -> DocumentState, or StateCodecError saying why not."""
    if len(data) < 4 or data[:3] != MAGIC:
        raise StateCodecError("not an incstream document state (bad magic)")
    version = data[3]
    if version != CODEC_VERSION:
        raise StateCodecError(
            f"document state codec version {version}; this build reads {CODEC_VERSION}"
        )
    raw = _inflate(data[4:], max_decoded_bytes)
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSON, UTF-8, 5000-digit integers, nesting
        raise StateCodecError(f"corrupt document state: {exc}") from None
    try:
        return _state_from_json(body)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise StateCodecError(f"document state with a missing or wrong field: {exc!r}"
                              ) from None


def _inflate(compressed: bytes, max_decoded_bytes: int) -> bytes:
    """zlib-inflate at most `max_decoded_bytes` (+1 to tell "exactly" from "more")."""
    inflate = zlib.decompressobj()
    try:
        raw = inflate.decompress(compressed, max_decoded_bytes + 1)
    except zlib.error as exc:
        raise StateCodecError(f"corrupt document state: {exc}") from None
    if len(raw) > max_decoded_bytes:
        raise StateCodecError(
            f"document state inflates past {max_decoded_bytes} bytes (a zlib bomb?)")
    if not inflate.eof:
        raise StateCodecError("corrupt document state: truncated zlib stream")
    return raw


def _state_from_json(body: Any) -> DocumentState:
    """Every field checked: a state that decodes is one the worker can use as it is."""
    doc_id, rev, text = body["doc_id"], body["rev"], body["text"]
    if not (isinstance(doc_id, str) and isinstance(text, str)):
        raise TypeError("doc_id and text must be strings")
    if not isinstance(rev, int) or isinstance(rev, bool) or rev < NO_REVISION:
        raise TypeError(f"rev must be an integer >= {NO_REVISION}")
    text.encode("utf-8")  # a lone surrogate would fail every later hash; fail here instead
    held = {int(r): event for r, event in body.get("held", {}).items()}
    if not all(isinstance(event, str | dict) for event in held.values()):
        raise TypeError("a held event must be its text or its JSON object")
    tokens = body.get("tokens")
    if tokens is not None and (not isinstance(tokens, int) or isinstance(tokens, bool)):
        raise TypeError("tokens must be an integer")
    return DocumentState(
        doc_id=doc_id,
        rev=rev,
        text=text,
        held=held,
        needs_snapshot=bool(body.get("needs_snapshot", False)),
        model_id=body.get("model_id"),
        tokens=tokens,
        label=body.get("label"),
    )
