"""The byte codec of a chunk's durable activation record (engine.incremental.chunk_record).

One record per chunk, so an edit rewrites only the chunks it touched: about 79 bytes a token
in fast mode (20 KB for a 256-token chunk), the token ids alone in exact mode. No pickle; every
field is a fixed-width little-endian array whose length the header gives, and every length is
checked against the bytes present before anything is read.

Wire format, version 1:
    b"ISA" | u8 version | u16 model-id length | model id (UTF-8) | u16 mode length | mode
    (UTF-8, e.g. "exact" or "fast/float32") | u32 content tokens n | u8 layers L | u8 heads H |
    u32 edits | u16 displacement | u8 flags (1 = fast part present) |
    int32[n] token ids | (if fast) int16[n + 2] position ids | uint8[L * (n + 2) * H] codes

A record written by another model or another engine mode decodes to None: the caller rebuilds
that chunk, never misreads it. Bytes that are not a record of this codec raise
ActivationRecordError (a named reason for a dead letter or a log line).
"""

from __future__ import annotations

import struct

import numpy as np
import torch

from incstream.engine.incremental.chunk_record import ChunkRecord

MAGIC = b"ISA"
VERSION = 1
_FIXED = struct.Struct("<IBBIHB")  # n, layers, heads, edits, displacement, flags
MAX_ROWS = 4096  # far above any chunk (512 positions); bounds what a bad header can ask for


class ActivationRecordError(ValueError):
    """Bytes that are not an activation record this code can read."""


def mode_tag(mode: str, matmul: str | None = None) -> str:
    """What a record's mode field says: "exact", or "fast/<matmul dtype>" (the dtype changes
    the activations, so records of one do not serve the other)."""
    return mode if mode == "exact" else f"{mode}/{matmul or 'float32'}"


def encode_chunk_record(record: ChunkRecord, model_id: str, mode: str) -> bytes:
    n = len(record.content)
    fast = record.codes is not None
    layers, rows, heads = record.codes.shape if fast else (0, n + 2, 0)
    if fast and (rows != n + 2 or record.positions is None or len(record.positions) != n + 2):
        raise ValueError(f"record of {n} tokens has codes for {rows} rows")
    parts = [MAGIC, bytes([VERSION])]
    for text in (model_id, mode):
        raw = text.encode("utf-8")
        parts += [struct.pack("<H", len(raw)), raw]
    parts.append(_FIXED.pack(n, layers, heads, record.edits, min(record.displacement, 65535),
                             int(fast)))
    parts.append(np.asarray(record.content, dtype="<i4").tobytes())
    if fast:
        parts.append(record.positions.to(torch.int16).numpy().astype("<i2").tobytes())
        parts.append(record.codes.to(torch.uint8).contiguous().numpy().tobytes())
    return b"".join(parts)


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.at = memoryview(data), 0

    def take(self, size: int, what: str) -> memoryview:
        if size < 0 or self.at + size > len(self.data):
            raise ActivationRecordError(f"activation record truncated in its {what}")
        chunk = self.data[self.at : self.at + size]
        self.at += size
        return chunk

    def text(self, what: str) -> str:
        (size,) = struct.unpack("<H", self.take(2, what))
        try:
            return bytes(self.take(size, what)).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ActivationRecordError(f"activation record's {what} is not UTF-8") from exc


def decode_chunk_record(data: bytes, model_id: str, mode: str) -> ChunkRecord | None:
    """The record, or None when it was written by another model or mode (rebuild the chunk)."""
    if len(data) < 4 or data[:3] != MAGIC:
        raise ActivationRecordError("not an activation record (bad magic)")
    if data[3] != VERSION:
        raise ActivationRecordError(f"activation record codec version {data[3]}, this code "
                                    f"reads {VERSION}")
    reader = _Reader(data)
    reader.take(4, "header")
    written_by, written_mode = reader.text("model id"), reader.text("mode")
    n, layers, heads, edits, displacement, flags = _FIXED.unpack(
        reader.take(_FIXED.size, "header"))
    if n + 2 > MAX_ROWS:
        raise ActivationRecordError(f"activation record claims {n} tokens")
    content = np.frombuffer(reader.take(4 * n, "token ids"), dtype="<i4")
    positions = codes = None
    if flags & 1:
        positions = torch.from_numpy(
            np.frombuffer(reader.take(2 * (n + 2), "position ids"), dtype="<i2").astype(
                np.int16))
        codes = torch.from_numpy(
            np.frombuffer(reader.take(layers * (n + 2) * heads, "codes"),
                          dtype=np.uint8).reshape(layers, n + 2, heads).copy())
    if reader.at != len(data):
        raise ActivationRecordError(f"activation record has {len(data) - reader.at} bytes "
                                    "past its end")
    if written_by != model_id or written_mode != mode:
        return None
    return ChunkRecord(content=tuple(int(t) for t in content), positions=positions,
                       codes=codes, edits=edits, displacement=displacement)
