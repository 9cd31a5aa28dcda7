"""The activation record codec: round trip, size, and refusal of anything it cannot read."""

from __future__ import annotations

import pytest
import torch

from incstream.engine.incremental.chunk_record import ChunkRecord
from incstream.state.activation_record import (
    ActivationRecordError,
    decode_chunk_record,
    encode_chunk_record,
    mode_tag,
)

FAST = mode_tag("fast", "float32")


def _fast_record(n: int = 254) -> ChunkRecord:
    g = torch.Generator().manual_seed(0)
    return ChunkRecord(content=tuple(torch.randint(0, 30_000, (n,), generator=g).tolist()),
                       positions=torch.arange(n + 2, dtype=torch.int16),
                       codes=torch.randint(0, 64, (6, n + 2, 12), generator=g,
                                           dtype=torch.uint8),
                       edits=7, displacement=3)


def test_fast_record_round_trips_at_about_79_bytes_a_token():
    record = _fast_record()
    blob = encode_chunk_record(record, "polarity-minilm-vq64", FAST)
    back = decode_chunk_record(blob, "polarity-minilm-vq64", FAST)
    assert back.content == record.content and (back.edits, back.displacement) == (7, 3)
    assert torch.equal(back.positions, record.positions)
    assert torch.equal(back.codes, record.codes)
    assert 78 <= len(blob) / len(record.content) <= 81


def test_exact_record_is_the_token_ids():
    record = ChunkRecord(content=(101, 7592, 2088))
    blob = encode_chunk_record(record, "m", "exact")
    assert decode_chunk_record(blob, "m", "exact") == record
    assert len(blob) < 40


def test_a_record_of_another_model_or_mode_is_not_read():
    blob = encode_chunk_record(_fast_record(10), "m", FAST)
    assert decode_chunk_record(blob, "other", FAST) is None
    assert decode_chunk_record(blob, "m", mode_tag("fast", "bfloat16")) is None
    assert decode_chunk_record(blob, "m", "exact") is None


@pytest.mark.parametrize("damage, message", [
    (lambda b: b"XXA" + b[3:], "bad magic"),
    (lambda b: b[:3] + bytes([9]) + b[4:], "version 9"),
    (lambda b: b[:-1], "truncated in its codes"),
    (lambda b: b[:20], "truncated"),
    (lambda b: b + b"\0", "past its end"),
    (lambda b: b"", "bad magic"),
])
def test_damaged_bytes_are_refused_with_a_reason(damage, message):
    blob = encode_chunk_record(_fast_record(10), "m", FAST)
    with pytest.raises(ActivationRecordError, match=message):
        decode_chunk_record(damage(blob), "m", FAST)


def test_a_header_cannot_ask_for_a_huge_allocation():
    blob = bytearray(encode_chunk_record(ChunkRecord(content=(1, 2)), "m", "exact"))
    at = 4 + 2 + 1 + 2 + 5  # magic+version, model id "m", mode "exact"
    blob[at : at + 4] = (2**31).to_bytes(4, "little")
    with pytest.raises(ActivationRecordError, match="claims"):
        decode_chunk_record(bytes(blob), "m", "exact")
