"""Revision ordering: duplicates, gaps, snapshots, rejections (state.ordering)."""

from engine.text_ops import sha1_hex
from state.document import DocumentState
from state.edit_event import EditEvent
from state.ordering import advance


def snapshot(rev: int, text: str, doc: str = "d1") -> EditEvent:
    return EditEvent(doc_id=doc, rev=rev, snapshot=text)


def insert_at_end(state_text: str, rev: int, piece: str, doc: str = "d1", **checks) -> EditEvent:
    return EditEvent(doc_id=doc, rev=rev, ops=[{"retain": len(state_text)}, {"insert": piece}],
                     **checks)


def test_snapshot_creates_then_edits_apply_in_order():
    d = advance(None, snapshot(0, "ab"))
    assert d.outcome == "ok" and d.state.text == "ab" and d.state.rev == 0
    d = advance(d.state, insert_at_end("ab", 1, "c", sha1_after=sha1_hex("abc"), len_after=3))
    assert d.outcome == "ok" and d.state.text == "abc" and d.state.rev == 1
    assert [a.rev for a in d.applied] == [1]


def test_duplicates_are_dropped_and_change_nothing():
    state = advance(None, snapshot(0, "ab")).state
    state = advance(state, insert_at_end("ab", 1, "c")).state
    for event in (snapshot(0, "zz"), insert_at_end("ab", 1, "c")):
        d = advance(state, event)
        assert d.outcome == "duplicate" and not d.state_changed and d.state == state


def test_gap_is_held_then_drained_in_order_when_it_fills():
    state = advance(None, snapshot(0, "a")).state
    d3 = advance(state, insert_at_end("abc", 3, "d"))
    assert d3.outcome == "gap" and d3.state.rev == 0 and set(d3.state.held) == {3}
    d2 = advance(d3.state, insert_at_end("ab", 2, "c"))
    assert d2.outcome == "gap" and set(d2.state.held) == {2, 3}
    assert advance(d2.state, insert_at_end("ab", 2, "c")).outcome == "duplicate"
    d1 = advance(d2.state, insert_at_end("a", 1, "b"))
    assert d1.outcome == "ok"
    assert [a.rev for a in d1.applied] == [1, 2, 3]
    assert d1.state.text == "abcd" and d1.state.rev == 3 and d1.state.held == {}


def test_events_before_the_first_snapshot_wait_for_it():
    d = advance(None, insert_at_end("x", 1, "y"))
    assert d.outcome == "gap" and not d.state.exists
    d = advance(d.state, snapshot(0, "x"))
    assert [a.rev for a in d.applied] == [0, 1] and d.state.text == "xy"


def test_gap_bound_overflow_goes_to_dlq_and_a_snapshot_resyncs():
    state = advance(None, snapshot(0, "a")).state
    state = advance(state, insert_at_end("a", 5, "x"), max_held=2).state
    state = advance(state, insert_at_end("a", 6, "x"), max_held=2).state
    d = advance(state, insert_at_end("a", 7, "x"), max_held=2)
    assert d.outcome == "dlq" and d.rejected[0].reason == "gap_overflow"
    assert d.state.needs_snapshot and set(d.state.held) == {5, 6}
    # A snapshot at rev 6 resyncs: held rev 5 and 6 are obsolete, the flag clears.
    r = advance(d.state, snapshot(6, "fresh"))
    assert r.outcome == "ok" and r.state.text == "fresh" and r.state.rev == 6
    assert r.state.held == {} and not r.state.needs_snapshot


def test_snapshot_resync_keeps_later_held_events_and_applies_them():
    state = advance(None, snapshot(0, "a")).state
    state = advance(state, insert_at_end("new", 5, "!")).state
    d = advance(state, snapshot(4, "new"))
    assert [a.rev for a in d.applied] == [4, 5] and d.state.text == "new!"


def test_rejections_leave_the_document_exactly_as_it_was():
    state = advance(None, snapshot(0, "abc")).state
    cases = {
        "ops_past_end": EditEvent("d1", 1, ops=[{"retain": 10}]),
        "invalid_ops": EditEvent("d1", 1, ops=[{"frobnicate": 1}]),
        "checksum_mismatch": insert_at_end("abc", 1, "d", sha1_after="0" * 40),
        "length_mismatch": insert_at_end("abc", 1, "d", len_after=99),
        "base_rev_mismatch": insert_at_end("abc", 1, "d", base_rev=7),
    }
    for reason, event in cases.items():
        d = advance(state, event)
        assert d.outcome == "dlq", reason
        assert d.rejected[0].reason == reason
        assert d.state == state and not d.state_changed
    # ... and the right next edit still applies.
    assert advance(state, insert_at_end("abc", 1, "d")).state.text == "abcd"


def test_a_held_event_that_turns_out_bad_is_rejected_and_draining_stops():
    state = advance(None, snapshot(0, "a")).state
    state = advance(state, EditEvent("d1", 2, ops=[{"retain": 99}])).state
    state = advance(state, insert_at_end("abc", 3, "d")).state
    d = advance(state, insert_at_end("a", 1, "b"))
    assert [a.rev for a in d.applied] == [1]
    assert [r.reason for r in d.rejected] == ["ops_past_end"]
    assert d.state.rev == 1 and d.state.text == "ab" and set(d.state.held) == {3}


def test_state_of_a_new_document_defaults():
    assert not DocumentState("x").exists
