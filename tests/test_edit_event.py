"""Parsing doc-edit/v1 off the wire."""

import json

import pytest

from state.edit_event import EventRejected, parse_edit_event


def test_edit_and_snapshot_parse():
    edit = parse_edit_event(json.dumps({
        "schema": "doc-edit/v1", "doc_id": "d1", "rev": 42, "base_rev": 41, "ts": 1700000000,
        "ops": [{"retain": 1}, {"insert": "x"}], "len_after": 2, "sha1_after": "A" * 40,
    }).encode())
    assert edit.rev == 42 and edit.base_rev == 41 and edit.sha1_after == "a" * 40
    assert not edit.is_snapshot
    snap = parse_edit_event(b'{"schema":"doc-edit/v1","doc_id":"d1","rev":0,"snapshot":"t"}')
    assert snap.is_snapshot and snap.snapshot == "t"
    assert parse_edit_event(json.dumps(snap.to_json())) == snap


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"{not json", "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        (None, "invalid_json"),
        (b"[1,2]", "invalid_event"),
        (b'{"schema":"doc-edit/v2","doc_id":"d","rev":1,"ops":[]}', "unknown_schema"),
        (b'{"doc_id":"d","rev":1,"ops":[]}', "unknown_schema"),
        (b'{"schema":"doc-edit/v1","rev":1,"ops":[]}', "invalid_event"),
        (b'{"schema":"doc-edit/v1","doc_id":"d","ops":[]}', "invalid_event"),
        (b'{"schema":"doc-edit/v1","doc_id":"d","rev":-1,"ops":[]}', "invalid_event"),
        (b'{"schema":"doc-edit/v1","doc_id":"d","rev":1}', "invalid_event"),
        (b'{"schema":"doc-edit/v1","doc_id":"d","rev":1,"ops":[],"snapshot":"x"}',
         "invalid_event"),
        (b'{"schema":"doc-edit/v1","doc_id":"d","rev":1,"ops":[],"sha1_after":"abc"}',
         "invalid_event"),
    ],
)
def test_bad_events_are_rejected_with_a_reason(raw, reason):
    with pytest.raises(EventRejected) as info:
        parse_edit_event(raw)
    assert info.value.reason == reason
