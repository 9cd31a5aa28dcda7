"""Where the worker keeps documents' chunk records: a key-value table (the Faust table
`activations`: RocksDB locally, changelogged to Kafka), one entry per chunk.

Key: the document id, a zero byte, and the first 16 bytes of the SHA-1 of the chunk's token
ids. An edit rewrites only the chunks it touched (one record of ~20 KB for a 256-token chunk
in fast mode) and deletes the records of the chunks it replaced, so a changelog record stays
small whatever the document's length. A session is brought back by cutting its text into
chunks again (the layout is a function of the tokens) and looking each chunk up by content.

Two chunks of one document with the same token ids share one entry (in exact mode they are
the same chunk anyway; in fast mode one of them may come back with the other's codes, or,
after the other was replaced, be rebuilt fresh). A record that cannot be read, or was written
by another model or mode, is skipped (the chunk is rebuilt) and counted, never misread.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, MutableMapping, Sequence

import numpy as np

from incstream.engine.incremental.chunk_record import ChunkRecord
from incstream.state.activation_record import (
    ActivationRecordError,
    decode_chunk_record,
    encode_chunk_record,
)

log = logging.getLogger("incstream.chunk_records")


def record_key(doc_id: str, content: Sequence[int]) -> bytes:
    digest = hashlib.sha1(np.asarray(content, dtype="<i4").tobytes()).digest()[:16]
    return doc_id.encode("utf-8") + b"\0" + digest


class ChunkRecordStore:
    def __init__(self, table: MutableMapping[bytes, bytes], model_id: str, mode: str):
        self.table, self.model_id, self.mode = table, model_id, mode
        self.unreadable = 0  # records skipped because their bytes could not be read
        self.foreign = 0  # records of another model or mode, skipped

    def load(self, doc_id: str, contents: Iterable[Sequence[int]]) -> list[ChunkRecord]:
        """The readable records of this model and mode for these chunk contents."""
        records = []
        for content in contents:
            raw = self.table.get(record_key(doc_id, content))
            if raw is None:
                continue
            try:
                record = decode_chunk_record(bytes(raw), self.model_id, self.mode)
            except ActivationRecordError as exc:
                self.unreadable += 1
                log.warning("chunk record of %r unreadable (%s); rebuilding the chunk",
                            doc_id, exc)
                continue
            if record is None:
                self.foreign += 1
            elif record.content == tuple(content):
                records.append(record)
        return records

    def changes(self, doc_id: str, written: Sequence[ChunkRecord],
                removed: Sequence[Sequence[int]]) -> dict[bytes, bytes | None]:
        """What to write after an edit: the touched chunks' records (bytes), and None (delete)
        for the replaced chunks that no written record has the content of."""
        out: dict[bytes, bytes | None] = {}
        for content in removed:
            out[record_key(doc_id, content)] = None
        for record in written:
            out[record_key(doc_id, record.content)] = encode_chunk_record(
                record, self.model_id, self.mode)
        return out

    def apply(self, changes: dict[bytes, bytes | None]) -> int:
        """Write `changes` to the table; returns the bytes written."""
        written = 0
        for key, value in changes.items():
            if value is None:
                if key in self.table:
                    del self.table[key]
            else:
                self.table[key] = value
                written += len(key) + len(value)
        return written
