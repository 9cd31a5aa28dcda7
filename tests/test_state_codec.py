"""The versioned byte codec of the durable document state."""

import json
import zlib

import pytest

from incstream.state.document import (
    CODEC_VERSION,
    MAGIC,
    MAX_DECODED_BYTES,
    DocumentState,
    StateCodecError,
    StateTooLarge,
    awaiting_snapshot,
    decode_state,
    encode_state,
)


def test_round_trip_keeps_everything():
    state = DocumentState(
        doc_id="peps/pep-0001", rev=41, text="naïve 😀\n" * 100,
        held={43: {"schema": "doc-edit/v1", "doc_id": "peps/pep-0001", "rev": 43, "ops": []}},
        needs_snapshot=True, model_id="m1", tokens=1234, label="positive",
    )
    assert decode_state(encode_state(state)) == state


def test_held_events_keep_their_text_as_it_arrived_and_old_json_ones_still_decode():
    raw = '{"rev": 5, "schema": "doc-edit/v1", "doc_id": "d", "ops": [], "note": "caf\\u00e9"}\n'
    old = {"schema": "doc-edit/v1", "doc_id": "d", "rev": 6, "ops": []}
    state = DocumentState(doc_id="d", rev=3, text="abc", held={5: raw, 6: old})
    assert decode_state(encode_state(state)).held == {5: raw, 6: old}


def test_values_written_before_the_label_field_still_decode():
    """A v1 value as the worker wrote it before `label` existed (changelogs keep them)."""
    old_body = {"doc_id": "d", "rev": 3, "text": "abc", "held": {}, "needs_snapshot": False,
                "model_id": None, "tokens": 1}
    old = MAGIC + bytes([1]) + zlib.compress(json.dumps(old_body).encode("utf-8"))
    state = decode_state(old)
    assert state == DocumentState(doc_id="d", rev=3, text="abc", tokens=1)
    assert state.label is None


def test_text_is_compressed():
    state = DocumentState(doc_id="d", rev=0, text="the same line again\n" * 5000)
    assert len(encode_state(state)) < len(state.text) / 20


def test_unknown_version_is_refused_not_misread():
    data = bytearray(encode_state(DocumentState(doc_id="d", rev=0, text="x")))
    data[3] = CODEC_VERSION + 1
    with pytest.raises(StateCodecError, match="version"):
        decode_state(bytes(data))


@pytest.mark.parametrize("data", [b"", b"nope", b"ISD\x01garbage"])
def test_garbage_is_refused(data):
    with pytest.raises(StateCodecError):
        decode_state(data)


def _v1(body: bytes | str) -> bytes:
    raw = body.encode("utf-8") if isinstance(body, str) else body
    return MAGIC + bytes([CODEC_VERSION]) + zlib.compress(raw)


def test_a_zlib_bomb_is_refused_without_being_inflated_whole():
    bomb = MAGIC + bytes([CODEC_VERSION]) + zlib.compress(b" " * (8 * 1024**2), 9)
    assert len(bomb) < 16_000
    with pytest.raises(StateCodecError, match="inflates past 1048576 bytes"):
        decode_state(bomb, max_decoded_bytes=1024**2)
    # At the default bound (64 MiB) a 300 MB bomb is cut off after 64 MiB.
    assert MAX_DECODED_BYTES == 64 * 1024**2


@pytest.mark.parametrize("body", [
    '{"rev": 1, "text": "x"}',  # no doc_id
    '{"doc_id": "d", "text": "x"}',  # no rev
    '{"doc_id": "d", "rev": 1}',  # no text
    '{"doc_id": "d", "rev": "1", "text": "x"}',
    '{"doc_id": "d", "rev": 1, "text": 5}',
    '{"doc_id": "d", "rev": 1, "text": "\\ud800"}',  # a lone surrogate
    '{"doc_id": "d", "rev": 1, "text": "x", "held": {"x": "y"}}',
    '{"doc_id": "d", "rev": 1, "text": "x", "held": [1]}',
    '{"doc_id": "d", "rev": 1, "text": "x", "tokens": "many"}',
    '[1, 2]',
    '"a string"',
    '[' * 100_000,  # nested past the parser's recursion limit
    '{"doc_id": "d", "rev": 1' + '0' * 5000 + ', "text": "x"}',  # past int's digit limit
])
def test_a_state_with_missing_or_wrong_fields_is_refused_not_an_internal_error(body):
    with pytest.raises(StateCodecError):
        decode_state(_v1(body))


def test_a_truncated_stream_is_refused():
    whole = encode_state(DocumentState(doc_id="d", rev=0, text="some text " * 100))
    with pytest.raises(StateCodecError, match="truncated"):
        decode_state(whole[: len(whole) // 2])


def test_a_state_that_would_inflate_past_the_bound_is_never_written():
    with pytest.raises(StateTooLarge):
        encode_state(DocumentState(doc_id="d", rev=0, text="a" * (MAX_DECODED_BYTES + 1)))


def test_the_state_that_replaces_an_unreadable_one_waits_for_a_snapshot():
    state = awaiting_snapshot("d")
    assert state.awaits_snapshot and not state.exists and state.text == ""
    assert decode_state(encode_state(state)) == state
    # A document that lost a gap keeps its text and revision: it does not await a snapshot.
    assert not DocumentState(doc_id="d", rev=3, text="abc", needs_snapshot=True).awaits_snapshot
