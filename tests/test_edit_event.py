"""Parsing doc-edit/v1 off the wire."""

import json

import pytest

from incstream.state.edit_event import EventRejected, parse_edit_event


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


def _event(**fields) -> bytes:
    return json.dumps({"schema": "doc-edit/v1", "doc_id": "d", "rev": 1, **fields}).encode()


@pytest.mark.parametrize(
    "raw, reason",
    [
        # lone surrogates, in every text the worker would hash, store or key by
        (_event(snapshot="ok \ud800"), "invalid_text"),
        (_event(ops=[{"retain": 0}, {"insert": "\udfff"}]), "invalid_text"),
        (json.dumps({"schema": "doc-edit/v1", "doc_id": "\ud83d", "rev": 0,
                     "snapshot": ""}).encode(), "invalid_text"),
        # nesting past the parser's recursion limit, and integers past int's digit limit
        (b"[" * 50_000 + b"]" * 50_000, "invalid_json"),
        (b'{"schema":"doc-edit/v1","doc_id":"d","rev":' + b"9" * 5000 + b',"ops":[]}',
         "invalid_json"),
        # revisions and lengths past int64; timestamps that are not finite
        (_event(rev=2**63, ops=[]), "invalid_event"),
        (_event(rev=10**100, ops=[]), "invalid_event"),
        (_event(ops=[], base_rev=2**64), "invalid_event"),
        (_event(ops=[], len_after=2**63), "invalid_event"),
        (b'{"schema":"doc-edit/v1","doc_id":"d","rev":1,"ops":[],"ts":NaN}', "invalid_event"),
        (b'{"schema":"doc-edit/v1","doc_id":"d","rev":1,"ops":[],"ts":1e999}', "invalid_event"),
        (_event(ops=[], ts=10**30), "invalid_event"),
        (json.dumps({"schema": "doc-edit/v1", "doc_id": "d" * 1025, "rev": 0,
                     "snapshot": ""}).encode(), "invalid_event"),
    ],
)
def test_hostile_events_get_a_named_reason(raw, reason):
    with pytest.raises(EventRejected) as info:
        parse_edit_event(raw)
    assert info.value.reason == reason


def test_the_largest_int64_revision_is_accepted():
    assert parse_edit_event(_event(rev=2**63 - 1, ops=[])).rev == 2**63 - 1


def test_events_over_the_size_limit_are_refused_before_parsing():
    big = _event(snapshot="x" * 2000)
    assert parse_edit_event(big, max_bytes=len(big)).snapshot == "x" * 2000
    with pytest.raises(EventRejected) as info:
        parse_edit_event(big + b" ", max_bytes=len(big))
    assert info.value.reason == "event_too_large" and str(len(big) + 1) in str(info.value)
    with pytest.raises(EventRejected) as info:  # not even looked at as JSON
        parse_edit_event(b"{" * (len(big) + 1), max_bytes=len(big))
    assert info.value.reason == "event_too_large"
