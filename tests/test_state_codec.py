"""The versioned byte codec of the durable document state."""

import json
import zlib

import pytest

from state.document import (
    CODEC_VERSION,
    MAGIC,
    DocumentState,
    StateCodecError,
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
